"""The ZeRO-3 load's scatter into the partitions, on 2 ranks through the real deepspeed launcher (CPU, gloo):
it writes DeepSpeed's partition layout by hand, so it is compared with DeepSpeed's own route bit for bit."""

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.distributed.launcher import deepspeed_launch

pytestmark = pytest.mark.slow


def test_scattering_into_the_partitions_equals_gathered_parameters_bit_for_bit(tmp_path):
    # Odd sizes: the embedding (33 x 15), routers (3 x 15), down experts (3 x 15 x 7) and norms of 15 do not
    # split evenly over 2 ranks, so the last rank's partition ends in padding; the attention's do.
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=33,
        hidden_size=15,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=6,
        intermediate_size=9,
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=7,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    result = deepspeed_launch("tests/distributed/partitioned_load_worker.py", "--checkpoint", str(tmp_path))
    found = re.search(r"PARTITIONED-LOAD-OK (\d+) uneven of (\d+)", result.stdout)
    assert found and int(found.group(1)) > 0, result.stdout[-2000:]
