"""Live progress of a training job: records appended to metrics.jsonl reach the caller while the job runs; a line a
crash left half-written neither breaks the records appended after it nor the reading of the file."""

import json
import threading
import time

from looplm.pipelines.pretrain import METRICS_FILE, append_record, following, read_metrics


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


def test_a_torn_last_line_is_skipped_said_and_does_not_swallow_the_next_record(tmp_path, capsys):
    path = tmp_path / METRICS_FILE
    append_record(path, {"step": 1, "loss": 3.0})
    with open(path, "a") as sink:  # a crash in the middle of writing step 2's record
        sink.write(json.dumps({"step": 2, "loss": 2.5})[:9])
    seen = []
    with following(path, lambda record: seen.append(record["step"])):
        append_record(path, {"step": 2, "loss": 2.5})  # the resumed run logs step 2 again, then goes on
        append_record(path, {"step": 3, "loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert seen == [2, 3]
    said = capsys.readouterr().err
    assert f"{path}: skipped 1 line(s) a crash left half-written (line 2)" in said
