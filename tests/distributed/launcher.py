"""Run a script under the real deepspeed launcher (CPU ranks, gloo), as users do."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_checked(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def deepspeed_launch(
    script: str, *args: str, num_ranks: int = 2, module: bool = False
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N [--module] script args`` on one node."""
    launcher = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port())]
    launcher += ["--module"] if module else ["--no_local_rank"]
    return run_checked([*launcher, script, *args])


def torchrun(script: str, *args: str, num_ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks)]
    return run_checked([*launcher, "--master_port", str(free_port()), script, *args])


def accelerate_launch(script: str, *args: str, num_ranks: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` with its DeepSpeed plugin (ZeRO-2), as an accelerate user would start a job."""
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(num_ranks)]
    launcher += ["--num_machines", "1", "--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "no"]
    return run_checked([*launcher, "--main_process_port", str(free_port()), script, *args])


def single_process(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_checked([sys.executable, script, *args])


def two_nodes_on_one_host(script: str, *args: str, hostfile: Path) -> None:
    """Two launcher calls, one per "node", joined through a 2-line hostfile without ssh."""
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                DEEPSPEED,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "--no_local_rank",
                script,
                *args,
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        if node.returncode != 0:
            raise AssertionError(f"node failed ({node.returncode}):\n{output[-4000:]}")
