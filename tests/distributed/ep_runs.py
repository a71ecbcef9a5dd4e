"""Running tests/distributed/ep_worker.py and reading back what it wrote."""

import json

import torch

from megamoe.checkpoint.export import load_checkpoint_model

WORKER = "tests/distributed/ep_worker.py"
STEPS = 4


def worker(out, **flags) -> list[str]:
    """The worker script and its arguments: ``--out OUT --steps 4`` plus ``--name value`` per flag; a list
    (of run directories, of backbones) gives its values one after another."""
    args = [WORKER, "--steps", str(STEPS)]
    for name, value in {"out": out, **flags}.items():
        args += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return args


def losses(run_dir):
    return json.loads((run_dir / "losses.json").read_text())["losses"]


def router_loads(run_dir):
    """Per step, the (MoE layer x expert) assignment counts over the global batch."""
    return json.loads((run_dir / "losses.json").read_text())["router_loads"]


def weights(run_dir):
    return load_checkpoint_model(run_dir).state_dict()


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def live_logits_match_export(run_dir, atol=1e-6):
    """The exported checkpoint computes what the live (sharded) model computed on the probe batch."""
    from tests.distributed.ep_worker import global_batch

    model = load_checkpoint_model(run_dir).eval()
    probe = global_batch(0)
    with torch.no_grad():
        logits = model(
            input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], task="topic"
        ).logits
    torch.testing.assert_close(logits, torch.load(run_dir / "live_logits.pt"), rtol=0, atol=atol)
