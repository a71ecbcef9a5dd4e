#!/usr/bin/env bash
# Run an sshd as the current (non-root) user for DeepSpeed's pdsh launcher, on $MEGAMOE_SSH_PORT (2222).
# Used by the Docker image: every node's container runs it; the first node then runs
# `launch/train.sh --hostfile ...`. A non-root sshd can only log in the user it runs as, with the keys in
# ~/.ssh/authorized_keys (mount them; never bake keys into the image). Host keys are made on first start.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/sshd.sh [--daemon] [--print-config]

Starts sshd for the current user on port $MEGAMOE_SSH_PORT (default 2222), key authentication only, in the
foreground (a container's command) or, with --daemon, in the background. Its state (host keys, config,
pid file) lives in $MEGAMOE_SSHD_DIR (default ~/.sshd). Sessions get PATH, LD_LIBRARY_PATH, CUDA_HOME,
HF_HOME, HF_TOKEN_PATH and the NCCL_* / MEGAMOE_* / NVIDIA_* variables of this environment (sshd would
otherwise reset them), never a *_TOKEN / *_SECRET / *_PASSWORD / *_KEY one.
  --print-config  print the generated sshd_config and exit.
EOF
}

daemon=0 print_only=0
for arg in "$@"; do
    case $arg in
        --daemon) daemon=1 ;;
        --print-config) print_only=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "sshd.sh: unknown argument $arg" >&2
            exit 2
            ;;
    esac
done

port=${MEGAMOE_SSH_PORT:-2222}
state=${MEGAMOE_SSHD_DIR:-$HOME/.sshd}
user=$(id -un)
mkdir -p "$state"
chmod 700 "$state"
[[ -f $state/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "megamoe-sshd@$(hostname)" -f "$state/host_ed25519"

# Environment for the ranks pdsh starts: an allowlist, so a secret in the container's env stays out.
setenv=()
while IFS= read -r name; do
    case $name in
        PATH | LD_LIBRARY_PATH | CUDA_HOME | HF_HOME | HF_TOKEN_PATH | NCCL_* | MEGAMOE_* | NVIDIA_*) ;;
        *) continue ;;
    esac
    [[ $name =~ _(PATH|FILE|DIR)$ || ! $name =~ (^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIALS?)(_|$) ]] ||
        continue
    setenv+=("\"$name=${!name//\"/}\"")
done < <(compgen -e | sort)

config=$(
    cat <<EOF
Port $port
HostKey $state/host_ed25519
PidFile $state/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers $user
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
X11Forwarding no
AllowAgentForwarding no
PrintMotd no
EOF
    ((${#setenv[@]} == 0)) || echo "SetEnv ${setenv[*]}"
)
echo "$config" >"$state/sshd_config"
if ((print_only)); then
    echo "$config"
    exit 0
fi
[[ -s $HOME/.ssh/authorized_keys ]] ||
    echo "sshd.sh: warning: $HOME/.ssh/authorized_keys is missing or empty: no one can log in" >&2
echo "sshd.sh: sshd for $user on port $port ($state/sshd_config)" >&2
if ((daemon)); then
    /usr/sbin/sshd -f "$state/sshd_config"
else
    exec /usr/sbin/sshd -D -e -f "$state/sshd_config"
fi
