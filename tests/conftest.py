import os

# Any accidental hub download must fail loudly, never hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny-model ops are dominated by per-op overhead: one thread avoids spin-waiting on a shared 2-core CPU.
torch.set_num_threads(1)
