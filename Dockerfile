# syntax=docker/dockerfile:1
# megamoe for multi-node GPU jobs: CUDA + PyTorch + DeepSpeed with its training ops prebuilt, pdsh and a
# non-root sshd (port 2222) for DeepSpeed's multi-node launcher. Usage: docs/launch.md ("Docker image").
#   docker build -t megamoe .
#
# Versions are pinned here and only here. tests/unit/test_launch_files.py checks that they satisfy
# pyproject.toml and that torch is the version .ci/run installs.
# Base image: NVIDIA's CUDA 13.0 devel image (nvcc for the DeepSpeed ops) with cuDNN on Ubuntu 24.04,
# plus the CUDA 13.0 (cu130) build of torch from PyTorch's wheel index, the CUDA line torch has shipped
# since 2.9. Not built here (no Docker engine on the development machines): if your torch release has no
# cu130 wheel, set CUDA_VERSION and TORCH_CUDA to a pair it has (e.g. 12.8.1 and cu128).
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG DEEPSPEED_VERSION=0.19.8
ARG TRANSFORMERS_VERSION=5.22.2
# GPU architectures the DeepSpeed ops are compiled for (no GPU is visible during `docker build`):
# A100, A10/RTX 30, L4/L40/RTX 40, H100/H200, B200, RTX 50 + PTX for newer ones. CUDA 13 dropped < 7.5.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ARG SSH_PORT=2222
ARG USER_NAME=megamoe
ARG USER_UID=1000

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG DEEPSPEED_VERSION
ARG TRANSFORMERS_VERSION
ARG TORCH_CUDA_ARCH_LIST
ARG SSH_PORT
ARG USER_NAME
ARG USER_UID

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pdsh + ssh for DeepSpeed's launcher; libaio for ZeRO-Infinity NVMe offload (async_io op); tcmalloc, which
# `megamoe train` preloads when it runs on CPU (the -dev package: its name is the same on every Ubuntu). No sudo.
# The host keys openssh-server generates on install would be shared by every container of the image:
# remove them; launch/sshd.sh makes the container's own at start. Nodes' host keys are new in every
# container, so ssh accepts a new one (and refuses a changed one).
# Ubuntu's packages are fixed by the release in the base tag; the Python pins are the ones that matter.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv build-essential \
        pdsh openssh-server openssh-client \
        libaio-dev libgoogle-perftools-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* \
    && printf 'Host *\n    StrictHostKeyChecking accept-new\n' >/etc/ssh/ssh_config.d/50-megamoe.conf

# The non-root user that runs everything (Ubuntu 24.04 images ship a user `ubuntu` with UID 1000).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --shell /bin/bash --uid "${USER_UID}" "${USER_NAME}" \
    && install -d -m 700 -o "${USER_NAME}" -g "${USER_NAME}" "/home/${USER_NAME}/.ssh" \
    && install -d -o "${USER_NAME}" -g "${USER_NAME}" /opt/megamoe

# Python environment (root-owned: the user runs it but cannot change it). The constraints file keeps
# every later install from moving the three pins; the build tools are unpinned.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_CONSTRAINT=/opt/venv/constraints.txt
# hadolint ignore=DL3013
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && printf 'torch==%s\ndeepspeed==%s\ntransformers==%s\n' \
        "${TORCH_VERSION}" "${DEEPSPEED_VERSION}" "${TRANSFORMERS_VERSION}" >"${PIP_CONSTRAINT}" \
    && pip install --upgrade pip setuptools wheel ninja packaging \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}"

# DeepSpeed from source with the ops training uses compiled now, not JIT-compiled on every node at the
# first step: fused Adam (GPU), CPU Adam (ZeRO offload), utils (flatten/unflatten), async_io (NVMe).
# DS_ACCELERATOR=cuda: no GPU is visible while building, and DeepSpeed would otherwise pick the CPU.
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 \
    DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 DS_BUILD_AIO=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=8 \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# The project: dependencies first (a cached layer while only the code changes), then the whole tree,
# owned by the user so runs/ can be written under it (/opt/megamoe is theirs).
WORKDIR /opt/megamoe
COPY pyproject.toml README.md ./
COPY megamoe ./megamoe
RUN pip install "transformers==${TRANSFORMERS_VERSION}" . && rm -rf build megamoe.egg-info
COPY --chown=${USER_NAME}:${USER_NAME} . .

# sshd for pdsh: `launch/sshd.sh` as the user, on this port (launch/train.sh passes it to DeepSpeed).
# Ranks reached over pdsh get the sshd session's environment, not the image's ENV: sshd.sh passes
# PATH, LD_LIBRARY_PATH, NCCL_* and friends on.
ENV MEGAMOE_SSH_PORT=${SSH_PORT}
EXPOSE ${SSH_PORT}

USER ${USER_NAME}
ENV HOME=/home/${USER_NAME}

RUN python -c "import megamoe, deepspeed, torch, transformers; \
from deepspeed.git_version_info import installed_ops; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert torch.version.cuda, 'a CPU build of torch was installed'; \
assert deepspeed.__version__ == '${DEEPSPEED_VERSION}', deepspeed.__version__; \
assert transformers.__version__ == '${TRANSFORMERS_VERSION}', transformers.__version__; \
missing = [op for op in ('fused_adam', 'cpu_adam', 'utils', 'async_io') if not installed_ops.get(op)]; \
assert not missing, f'DeepSpeed ops not prebuilt: {missing}'; \
print('megamoe', megamoe.__version__, '| torch', torch.__version__, 'CUDA', torch.version.cuda, \
      '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"

CMD ["bash"]
