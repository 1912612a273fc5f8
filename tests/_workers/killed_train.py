"""Runs `keras-moe train` in this process and kills it with SIGKILL at a chosen point.

Usage: python killed_train.py POINT N -- <keras-moe train arguments>

The points are where a crash can interrupt a run (the N-th occurrence, counted from 1):

- `backup-mid-write`: while the N-th epoch backup's HDF5 file is being written (its
  third dataset: the file is partly written);
- `backup-before-rename`: the N-th epoch backup is complete and fsynced, not yet renamed
  to its final name;
- `history-mid-line`: the N-th `history.jsonl` row is half written;
- `checkpoint-mid-write`: while the N-th `.keras` file (phase checkpoints, then
  `model.keras`) is being written;
- `before-backup-cleanup`: a phase's checkpoint is safe, its backups not yet deleted
  (the N-th such deletion);
- `after-backup`: the N-th epoch backup is complete (an epoch boundary: the next epoch
  has not begun);
- `mid-epoch`: after the N-th training batch (counted over the whole run), inside an
  epoch;
- `between-state-and-weights`: the N-th epoch backup's state file is written, its
  weights file not yet begun;
- `poison-weights`: not a kill: after the N-th training batch every trainable weight
  is made infinite, so the next batch's loss is not finite (a run made to diverge
  after a good epoch; it must stop by itself, exit 1).

The hooks wrap this package's and h5py's functions; nothing in the package knows about
them. With a point that is never reached the run finishes normally (exit 0); a killed
run exits with -9.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point, n):
    import shutil

    import h5py

    from keras_moe.training import run_dir

    seen = {"count": 0, "inside": None, "datasets": 0}

    def reached():
        seen["count"] += 1
        return seen["count"] == n

    def mid_write(kind, original):
        def wrapper(*args, **kwargs):
            seen["inside"] = kind if reached() else None
            seen["datasets"] = 0
            try:
                return original(*args, **kwargs)
            finally:
                seen["inside"] = None
        return wrapper

    create_dataset = h5py.Group.create_dataset

    def counting_create_dataset(self, *args, **kwargs):
        if seen["inside"] is not None:
            seen["datasets"] += 1
            if seen["datasets"] == 3:
                _die()
        return create_dataset(self, *args, **kwargs)

    h5py.Group.create_dataset = counting_create_dataset
    if point == "backup-mid-write":
        run_dir.save_weights = mid_write("backup", run_dir.save_weights)
    elif point == "checkpoint-mid-write":
        run_dir.save_model = mid_write("model", run_dir.save_model)
    elif point == "backup-before-rename":
        replace = run_dir._replace

        def killing_replace(temporary, path):
            if str(path).endswith(".weights.h5") and reached():
                _die()
            return replace(temporary, path)

        run_dir._replace = killing_replace
    elif point == "history-mid-line":
        on_epoch_end = run_dir.HistoryWriter.on_epoch_end

        def torn(self, epoch, logs=None):
            if reached():
                with open(self.path, "a") as f:
                    f.write('{"phase": "' + self.phase + '", "epo')
                _die()
            return on_epoch_end(self, epoch, logs)

        run_dir.HistoryWriter.on_epoch_end = torn
    elif point == "before-backup-cleanup":
        rmtree = shutil.rmtree

        def killing_rmtree(path, *args, **kwargs):
            if "backup" in str(path) and reached():
                _die()
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = killing_rmtree
    elif point == "after-backup":
        on_epoch_end = run_dir.EpochBackup.on_epoch_end

        def killing_on_epoch_end(self, epoch, logs=None):
            on_epoch_end(self, epoch, logs)
            if reached():
                _die()

        run_dir.EpochBackup.on_epoch_end = killing_on_epoch_end
    elif point == "between-state-and-weights":
        save_weights = run_dir.save_weights

        def killing_save_weights(model, path):
            if reached():
                _die()
            return save_weights(model, path)

        run_dir.save_weights = killing_save_weights
    elif point == "poison-weights":
        def poisoning_on_train_batch_end(self, batch, logs=None):
            if reached():
                for variable in self.model.trainable_variables:
                    variable.assign(variable + float("inf"))

        run_dir.EpochBackup.on_train_batch_end = poisoning_on_train_batch_end
    elif point == "mid-epoch":
        def killing_on_train_batch_end(self, batch, logs=None):
            if reached():
                _die()

        run_dir.EpochBackup.on_train_batch_end = killing_on_train_batch_end
    else:
        raise SystemExit(f"unknown point {point!r}")


def main(argv):
    point, n, separator, *train = argv
    assert separator == "--", argv
    install(point, int(n))
    from keras_moe import cli

    sys.argv = ["keras-moe", "train", *train]  # what the run directory's command.txt records
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
