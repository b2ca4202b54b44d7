"""Stand-in for modules/shared_state.py: the progress state of the running job."""

import datetime
import logging
import time

log = logging.getLogger(__name__)


class State:
    """``shared.state``; A1111 brackets every job with ``begin(job)`` … ``end()``."""

    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    time_start = None

    def interrupt(self):
        self.interrupted = True

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = job
        log.info("Starting job %s", job)

    def end(self):
        log.info("Ending job %s (%.2f seconds)", self.job, time.time() - self.time_start)
        self.job = ""
        self.job_count = 0
