"""Stand-in for modules/script_callbacks.py: registries that extensions add callbacks to."""

import inspect
import logging
from collections import namedtuple

log = logging.getLogger(__name__)

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_settings=[],
    callbacks_script_unloaded=[],
)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def report_exception(c, job):
    log.exception("Error executing callback %s for %s", job, c.script)


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    """Remember ``fun`` with the script file that registered it (found on the call stack)."""
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun, name or f"{filename}/{category}"))


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, "app_started_callback")


def model_loaded_callback(sd_model):
    for c in callback_map["callbacks_model_loaded"]:
        try:
            c.callback(sd_model)
        except Exception:
            report_exception(c, "model_loaded_callback")


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def on_app_started(callback, *, name=None):
    """``callback(demo: gr.Blocks | None, app: FastAPI)`` once the server runs (demo is None with --nowebui)."""
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    """``callback(sd_model)`` after a checkpoint is loaded or its weights are reloaded."""
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    """``callback()`` returns None or ``[(gradio_component, title, elem_id)]`` for new tabs."""
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")
