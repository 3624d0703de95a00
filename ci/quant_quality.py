"""Quality of int8/int4 weights against float32: mean/max KL and top-1 agreement of next-token
distributions over a fixed token stream (``hwlm.bench.quality``).

    python ci/quant_quality.py --model c1-llama --quantization int8 int4
    python ci/quant_quality.py --model /path/to/hf-folder --num-tokens 1024
"""

from __future__ import annotations

import logging

from hwlm.bench.quality import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
