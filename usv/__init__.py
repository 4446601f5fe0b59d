"""usv: short videos → multimodal features → training.

Set before any model library starts its thread pools: stages run side by side on few cores,
and OpenMP workers that spin while waiting (the default) burn the cycles the other stage needs
(≈4 CPU-seconds of 50 in the throughput benchmark). A value the user set is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")
