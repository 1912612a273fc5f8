"""Training that is killed and resumed with `keras.callbacks.BackupAndRestore`.

Usage: python resume_training.py DATA.npz WORKDIR MODE

- MODE "interrupted": trains with a backup in WORKDIR/backup (saved at every epoch's
  end); at batch `PAUSE_BATCH` of epoch `PAUSE_EPOCH` (after that many epochs' backups)
  it writes WORKDIR/ready and waits, to be killed with SIGKILL mid-epoch.
- MODE "resume": runs the same script again: BackupAndRestore restores weights, optimizer
  state and epoch, training finishes, final weights go to WORKDIR/resumed.npz and the
  epochs it ran to WORKDIR/resumed_epochs ("2 3" after a restore). Then, in
  the same process, an uninterrupted run from the same initial weights (its own, new
  backup directory) writes WORKDIR/uninterrupted.npz.

The model is the tiny `two_domain_moe` of `two_domain_training` (entropy gate loss, no
randomness in training), Adam (its moments must be restored too), no shuffling,
`tf.config.experimental.enable_op_determinism()`.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(__file__))

EPOCHS = 4
PAUSE_EPOCH = 2  # 0-based: two epochs are backed up when the run is killed
PAUSE_BATCH = 2


def _fit(data_path, backup_dir, pause_file=None, epochs_file=None):
    import keras
    import numpy as np
    import tensorflow as tf

    import two_domain_training as training

    with np.load(data_path) as data:
        x, y = data["x"], data["y"]
        initial = [data[f"w{i}"] for i in range(len(data.files) - 2)]
    model = training.build_model("entropy")
    model.set_weights(initial)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(training.GLOBAL_BATCH)
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")]
    if pause_file is not None:
        callbacks.append(_pause_for_kill(pause_file))
    epochs_run = []
    callbacks.append(keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch)))
    model.fit(dataset, epochs=EPOCHS, verbose=0, callbacks=callbacks)
    if epochs_file is not None:
        with open(epochs_file, "w") as f:
            f.write(" ".join(map(str, epochs_run)))
    return model.get_weights()


def _pause_for_kill(path):
    import keras

    class PauseForKill(keras.callbacks.Callback):
        """Signals "ready" mid-epoch PAUSE_EPOCH, then waits to be killed."""

        def __init__(self, path):
            super().__init__()
            self.path = path
            self.epoch = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == PAUSE_EPOCH and batch == PAUSE_BATCH:
                with open(self.path, "w") as f:
                    f.write(f"epoch {self.epoch} batch {batch}\n")
                time.sleep(600)  # the test kills this process here

    return PauseForKill(path)


def main(data_path, workdir, mode):
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    backup = os.path.join(workdir, "backup")
    if mode == "interrupted":
        _fit(data_path, backup, pause_file=os.path.join(workdir, "ready"))
        raise SystemExit("the interrupted run was not killed")
    weights = _fit(data_path, backup, epochs_file=os.path.join(workdir, "resumed_epochs"))
    np.savez(os.path.join(workdir, "resumed.npz"), *weights)
    if os.path.exists(backup):
        raise SystemExit("BackupAndRestore left its backup after a finished run")
    weights = _fit(data_path, os.path.join(workdir, "backup_uninterrupted"))
    np.savez(os.path.join(workdir, "uninterrupted.npz"), *weights)
    print("DONE")


if __name__ == "__main__":
    main(*sys.argv[1:4])
