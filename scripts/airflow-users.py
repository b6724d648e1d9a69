"""Create or update the Airflow users of the FAB auth manager from the environment; safe to run
again (scripts/airflow-init.sh runs it at every start of the stack's airflow-init).

* ``AIRFLOW_ADMIN_USERNAME`` and ``AIRFLOW_ADMIN_PASSWORD``: the administrator (role ``Admin``).
* ``AIRFLOW_USERS``: more people, comma-separated ``username:Role`` (a FAB role: ``Viewer``
  reads, ``User`` and ``Op`` also trigger runs and answer approvals, ``Admin`` everything),
  each with its password in ``AIRFLOW_PASSWORD_<USERNAME>`` (upper case, anything but letters
  and digits as ``_``), else in ``AIRFLOW_USER_PASSWORDS``, a JSON object ``{"username":
  "password"}`` (the compose stack's, from docker/.env). No password ships with the project,
  and none has a default.

An existing user gets the role and the password the environment gives now, so removing a role
or rotating a password is editing the environment and restarting airflow-init. Users the
environment does not name are left alone (delete them with ``airflow users delete``).
Exit 2 with one line naming the variable when the environment is incomplete.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping

ROLES = ("Admin", "Op", "User", "Viewer", "Public")


class EnvironmentIncomplete(Exception):
    pass


def password_variable(username: str) -> str:
    return "AIRFLOW_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", username.upper())


def wanted_users(env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(username, role, password)`` for everyone the environment names."""
    admin, admin_password = env.get("AIRFLOW_ADMIN_USERNAME", ""), env.get("AIRFLOW_ADMIN_PASSWORD", "")
    if not admin or not admin_password:
        missing = "AIRFLOW_ADMIN_USERNAME" if not admin else "AIRFLOW_ADMIN_PASSWORD"
        raise EnvironmentIncomplete(f"{missing}: expected it set (the project ships no default user), found it empty")
    users = [(admin, "Admin", admin_password)]
    try:
        listed = json.loads(env.get("AIRFLOW_USER_PASSWORDS") or "{}")
    except ValueError:
        listed = None
    if not isinstance(listed, dict):
        raise EnvironmentIncomplete(
            'AIRFLOW_USER_PASSWORDS: expected a JSON object {"username": "password"}, found something else'
        )
    for entry in filter(None, (part.strip() for part in env.get("AIRFLOW_USERS", "").split(","))):
        username, _, role = entry.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", username) or role not in ROLES:
            raise EnvironmentIncomplete(
                f"AIRFLOW_USERS: expected username:Role with Role one of {', '.join(ROLES)}, found {entry!r}"
            )
        password = env.get(password_variable(username)) or str(listed.get(username) or "")
        if not password:
            raise EnvironmentIncomplete(
                f"{password_variable(username)}: expected the password of {username} "
                "(or an entry in AIRFLOW_USER_PASSWORDS), found none"
            )
        users.append((username, role, password))
    return users


def sync(users: list[tuple[str, str, str]]) -> list[str]:
    """Create or update each user in FAB's tables; returns what was done, one line each."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    done = []
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for username, role_name, password in users:
            role = sm.find_role(role_name)
            existing = sm.find_user(username=username)
            if existing is None:
                sm.add_user(
                    username=username,
                    first_name=username,
                    last_name="",
                    email=f"{username}@users.airflow.invalid",
                    role=role,
                    password=password,
                )
                done.append(f"created {username} ({role_name})")
            else:
                existing.roles = [role]
                sm.update_user(existing)
                sm.reset_password(existing.id, password)
                done.append(f"updated {username} ({role_name})")
    return done


def main() -> int:
    try:
        users = wanted_users(os.environ)
    except EnvironmentIncomplete as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in sync(users):
        print(f"airflow users: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
