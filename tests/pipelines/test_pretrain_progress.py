"""Live progress of a training job: records appended to metrics.jsonl reach the caller while the job runs."""

import json
import threading
import time

from looplm.pipelines.pretrain import following


def test_following_reports_each_record_once_as_it_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 9.0}) + "\n")  # an earlier run's record: not reported again
    seen, times = [], []

    def writer():
        with open(path, "a") as sink:
            for step in (1, 2, 3):
                sink.write(json.dumps({"step": step, "loss": 9.0 - step}))
                sink.flush()
                time.sleep(0.3)  # half a line on disk for a while: it must wait for its newline
                sink.write("\n")
                sink.flush()

    started = time.monotonic()
    with following(path, lambda record: (seen.append(record["step"]), times.append(time.monotonic()))):
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
    assert seen == [1, 2, 3]
    assert times[0] - started < 1.5  # the first record arrived while the job was still writing


def test_following_without_a_callback_does_nothing(tmp_path):
    with following(tmp_path / "absent.jsonl", None):
        pass
