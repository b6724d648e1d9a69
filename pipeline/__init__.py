"""An ML pipeline from an IDX image dataset to an evaluated, registered model.

One stage per module, each a plain function over references (URIs, hashes, run ids):
:mod:`~pipeline.acquire`, :mod:`~pipeline.validate`, :mod:`~pipeline.preprocess`,
:mod:`~pipeline.train`, :mod:`~pipeline.evaluate`, :mod:`~pipeline.register`; :mod:`~pipeline.run`
chains them without Airflow, and ``dags/training_pipeline.py`` chains them with it.
"""

__version__ = "0.1.0"
