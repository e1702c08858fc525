"""Adds ``dsocr.speed.SpeedMeter`` to every ``transformers.Trainer`` of an older checkout (benchmarks only).

``bench/train_speed.py --baseline-tree`` puts this folder on ``PYTHONPATH`` for the old code's runs, so
both codes are timed by the same host-clock callback; nothing else of the old code changes. The callback
is loaded from the file named by ``DSOCR_BENCH_SPEED_SRC`` (the current checkout), not imported as a
package, so the old tree's own packages stay first on the path.
"""

import importlib.util
import os


def _install() -> None:
    src = os.environ.get("DSOCR_BENCH_SPEED_SRC")
    if not src:
        return
    import transformers

    spec = importlib.util.spec_from_file_location("_bench_speed", os.path.join(src, "dsocr", "speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        a = self.args
        self.add_callback(speed.SpeedMeter(a.per_device_train_batch_size * a.gradient_accumulation_steps
                                           * max(a.world_size, 1)))

    transformers.Trainer.__init__ = init


_install()
