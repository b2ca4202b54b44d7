"""Stand-in for modules/call_queue.py: the lock every generation holds."""

from functools import wraps

from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    """Run ``func`` holding ``queue_lock``, as A1111 wraps its queued UI handlers."""

    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f
