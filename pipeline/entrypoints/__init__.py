"""How people and Airflow call the pipeline: the CLI, the Airflow task adapter, the whole-chain
runner."""
