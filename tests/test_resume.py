"""Nothing lost: a training run killed with SIGKILL resumes to the uninterrupted weights.

`tests/_workers/resume_training.py` trains a tiny zoo model (`two_domain_moe` with its
entropy gate loss, Adam, fixed data order, op determinism) with
`keras.callbacks.BackupAndRestore(save_freq="epoch")`. The test kills it mid-epoch, after
two epochs were backed up, restarts it, and compares the final weights with an
uninterrupted run from the same initial weights: equal to float32 rounding.

Choice: `save_freq="epoch"`. The backup then holds weights, optimizer state and the
epoch count at an epoch boundary; the resumed run repeats the killed epoch from its
first batch over the same (unshuffled) batches, so its result is the uninterrupted one.
With `save_freq=N` batches Keras 3.15 restores the epoch but restarts the dataset at
the epoch's first batch, which replays batches already applied.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np

WORKERS = os.path.join(os.path.dirname(__file__), "_workers")
sys.path.insert(0, WORKERS)
import two_domain_training as training  # noqa: E402

SCRIPT = os.path.join(WORKERS, "resume_training.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path):
    import keras

    x, y = training.make_data()
    keras.utils.set_random_seed(5)
    initial = training.build_model("entropy").get_weights()
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y, **{f"w{i}": w for i, w in enumerate(initial)})

    log = open(tmp_path / "interrupted.log", "w")
    process = subprocess.Popen([sys.executable, SCRIPT, str(data), str(tmp_path),
                                "interrupted"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert process.poll() is None, (tmp_path / "interrupted.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training run never reached its pause"
            time.sleep(0.2)
        backup = tmp_path / "backup"
        assert backup.is_dir() and any(backup.iterdir()), "no backup before the kill"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert (tmp_path / "ready").read_text().startswith("epoch 2 batch 2")

    result = subprocess.run([sys.executable, SCRIPT, str(data), str(tmp_path), "resume"],
                            env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DONE" in result.stdout
    # It restored the backup: it ran only the killed epoch and the last one.
    assert (tmp_path / "resumed_epochs").read_text() == "2 3"
    with np.load(tmp_path / "resumed.npz") as resumed, \
            np.load(tmp_path / "uninterrupted.npz") as uninterrupted:
        assert len(resumed.files) == len(initial)
        for key in resumed.files:
            np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-6, atol=0,
                                       err_msg=key)
        # Training moved the weights: the comparison is not between two initial states.
        moved = max(np.abs(uninterrupted[f"arr_{i}"] - w).max() for i, w in enumerate(initial))
        assert moved > 1e-2
