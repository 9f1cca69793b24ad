"""app/uvicorn_worker.py tune_gc: what the worker does to the collector before serving."""
import gc

from app import uvicorn_worker


def test_the_worker_freezes_the_loaded_app_and_collects_young_objects_less_often(monkeypatch):
    before = gc.get_threshold()
    served = []
    monkeypatch.setattr(uvicorn_worker.UvicornWorker, "run", lambda self: served.append(
        (gc.get_freeze_count(), gc.get_threshold())))
    worker = object.__new__(uvicorn_worker.ChatUvicornWorker)  # no gunicorn arbiter needed for run()
    try:
        worker.run()
        (frozen, threshold), = served
        assert frozen > 10000  # Django and the app's modules
        assert threshold == (uvicorn_worker.GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
