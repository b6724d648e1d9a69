"""An ML pipeline from an IDX image dataset to an evaluated, registered model.

One stage per module, each a plain function over references (URIs, hashes, run ids):
:mod:`~pipeline.data.acquire`, :mod:`~pipeline.data.validate`, :mod:`~pipeline.data.preprocess`,
:mod:`~pipeline.training.fit`, :mod:`~pipeline.evaluation.evaluate`, :mod:`~pipeline.registry.register`; :mod:`~pipeline.entrypoints.run`
chains them without Airflow, and ``dags/training_pipeline.py`` chains them with it.
"""

__version__ = "0.1.0"
