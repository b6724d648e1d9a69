-- The stack's databases, created by the postgres image on the first start of an empty data
-- volume, owned by POSTGRES_USER: Airflow's metadata (and Celery's results), MLflow's runs and
-- registry, MLflow's users and permissions.
CREATE DATABASE airflow;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
