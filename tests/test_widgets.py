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


def test_a_button_pressed_after_the_stack_stopped_says_how_to_restart(tasks_module):
    """Run All ends with stack.stop(); a button pressed afterwards reports in its own output."""
    import ipywidgets

    from celerylab.stack import Stack
    stack = Stack("widgetstop").start()
    mod = __import__(tasks_module)
    box = widgets.queue_explorer(mod.add, stack.redis, queue="parked")
    stack.stop()
    send = box.children[0].children[1]
    out = box.children[1]
    assert isinstance(send, ipywidgets.Button) and isinstance(out, ipywidgets.Output)
    send.click()
    text = "".join(o.get("text", "") for o in out.outputs)
    assert "stack is stopped" in text and "celerylab.start" in text, out.outputs


def test_an_error_in_a_callback_shows_in_the_widget():
    import ipywidgets
    out = ipywidgets.Output()

    def boom(_):
        raise ValueError("bad value")

    widgets.reported(out, boom)(None)
    assert "ValueError: bad value" in "".join(o.get("text", "") for o in out.outputs)


def test_time_handler_times_each_request():
    import time

    from celerylab.widgets import handler_timer, time_handler
    got = time_handler(lambda i: time.sleep(0.01 * (i + 1)), 3)
    assert got["requests"] == 3 and 15 <= got["median ms"] < 60 and got["max ms"] >= 30
    box = handler_timer({"a": lambda i: None, "b": lambda i: None})
    assert [c.__class__.__name__ for c in box.children] == ["ToggleButtons", "HBox", "Output"]


def test_a_control_follows_the_stack_the_setup_cell_restarted(tasks_module):
    """Run All, then the setup cell again (a new stack, the first one's Redis gone): the control
    made in the first run, pressed again, works on the new stack; no need to re-run its cell."""
    import celerylab
    first = celerylab.start("widgetfollow")
    try:
        mod = __import__(tasks_module)
        box = widgets.queue_explorer(mod.add, first.redis, queue="parked")
        second = celerylab.start("widgetfollow")  # the setup cell, re-run: the first one stops
        assert first.stopped and not first.server.group.alive
        box.children[0].children[1].click()
        text = "".join(o.get("text", "") for o in box.children[1].outputs)
        assert second.redis.llen("parked") == 5, text  # sent through the new stack
    finally:
        celerylab.stack.current().stop()
