"""The logic behind the notebooks' controls, on a live broker (no widget needed)."""

from celerylab import widgets


def test_send_and_inspect_then_purge(stack, tasks_module):
    mod = __import__(tasks_module)
    report = widgets.send_and_inspect(mod.add, stack.redis, 4, queue="parked")
    assert report["depth"] == 4 and report["sent"] == 4
    assert report["oldest id"] == report["ids"][0] and report["newest id"] == report["ids"][-1]
    assert widgets.purge(stack.redis, "parked") == 4
    assert stack.redis.llen("parked") == 0


def test_queue_explorer_builds():
    import ipywidgets

    class FakeTask:  # only its type matters here; the buttons are not clicked
        pass

    box = widgets.queue_explorer(FakeTask(), None)
    assert isinstance(box, ipywidgets.VBox)
