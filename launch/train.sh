#!/usr/bin/env bash
# Start `megamoe train` under the DeepSpeed launcher: on one node, on many nodes over pdsh, or one node at
# a time without ssh (what SLURM and Kubernetes use). It builds one `deepspeed` command line, prints it and
# runs it; see docs/launch.md for every mode with exact commands.
set -euo pipefail

readonly DEFAULT_MASTER_PORT=29500
# Names that mark a variable or an override as a secret: whole words between '_' (env) or '.', '_', '-'.
# A name ending in _PATH / _FILE / _DIR says where a secret is (HF_TOKEN_PATH), which is fine to pass.
readonly SECRET_ENV_RE='(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|APIKEY|CREDENTIALS?)(_|$)'
readonly SECRET_ARG_RE='(^|[._-])(token|secret|password|passwd|api_key|apikey|credentials?)([._-]|$)'
readonly HF_TOKEN_VALUE_RE='hf_[A-Za-z0-9]{20,}'
# DeepSpeed's pdsh runner copies every variable whose name starts with one of these into the remote command
# (runner.py: EXPORT_ENVS + the CUDA accelerator's export_envs) and logs that command.
readonly PDSH_EXPORTED_PREFIXES=(NCCL PYTHON MLFLOW MV2 UCX)

usage() {
    cat <<'EOF'
Usage: launch/train.sh [OPTIONS] [--] CONFIG.yaml [dotted.overrides ...] [--resume [PATH]]

Runs `deepspeed [launcher args] --no_local_rank --module megamoe train ...`. Every rank reads RANK,
LOCAL_RANK and WORLD_SIZE from the environment. Everything after `--` (or from the first argument that
is not an option of this script) goes to `megamoe train`.

Modes:
  single node       (default) one launcher on this machine, all visible GPUs or --num-gpus N of them.
                    On a CPU-only machine --num-gpus N starts N CPU ranks (gloo).
  multi-node        --hostfile FILE: DeepSpeed reaches every host of FILE with pdsh over ssh and starts
                    the ranks there; run this once, on the first host.
  per-node, no ssh  --node-rank R --nnodes N --master-addr ADDR: run this once on every node (what SLURM's
                    srun and Kubernetes do); passes --no_ssh --node_rank R and a hostfile of N nodes with
                    --num-gpus slots each (generated), or your --hostfile.

Options:
  --num-gpus N        GPUs (ranks) per node. Default: all visible (single node); in the per-node mode the
                      count of CUDA_VISIBLE_DEVICES, else of `nvidia-smi -L`.
  --hostfile FILE     DeepSpeed hostfile, lines `HOST slots=N` (launch/hostfile.example).
  --num-nodes N       multi-node: use only the first N hosts of the hostfile.
  --master-addr ADDR  address of node 0 (rank 0). Required per node; multi-node infers it over ssh.
  --master-port PORT  rendezvous port on node 0 (default 29500).
  --node-rank R       per-node mode: this node's index in [0, nnodes).
  --nnodes N          per-node mode: number of nodes (or the number of hosts in --hostfile).
  --ssh-port PORT     multi-node: sshd port on the hosts (default $MEGAMOE_SSH_PORT, 2222 in our image).
  --script FILE       run the Python script FILE instead of `megamoe train` (e.g. launch/smoke_test.py).
  --ds-arg ARG        pass ARG to the deepspeed launcher verbatim (repeatable), e.g. --ds-arg=--include=h1@h2
  --dry-run           print the deepspeed command and exit without running it.
  -h, --help          show this help.

Secrets: DeepSpeed's pdsh runner writes every variable of .deepspeed_env (read from ~ and from the current
directory) into the remote command line and logs it. This script refuses a .deepspeed_env that holds a
*_TOKEN / *_SECRET / *_PASSWORD / *_KEY variable, secret-looking overrides, and (multi-node) exported
NCCL_* / PYTHON* / MLFLOW_* / UCX_* / MV2_* secrets. Give the ranks the Hugging Face token with
`hf auth login` on each node (the token file under $HF_HOME), or, in the per-node mode, HF_TOKEN in each
node's own environment.

Examples:
  launch/train.sh --num-gpus 8 configs/multitask_minilm.yaml train.max_steps=1000
  launch/train.sh --hostfile launch/hostfile --master-addr 10.0.0.1 -- configs/multitask_minilm.yaml
  launch/train.sh --node-rank 1 --nnodes 2 --master-addr 10.0.0.1 --num-gpus 8 configs/multitask_minilm.yaml
EOF
}

is_secret_name() { # NAME
    local name=${1^^}
    [[ ! $name =~ _(PATH|FILE|DIR)$ && $name =~ $SECRET_ENV_RE ]]
}

die() {
    echo "train.sh: error: $*" >&2
    exit 2
}

note() {
    echo "train.sh: $*" >&2
}

require_int() { # NAME VALUE
    [[ $2 =~ ^[0-9]+$ ]] || die "$1 needs a non-negative integer, got '$2'"
}

# Print the hosts of a DeepSpeed hostfile, one per line (the lines DeepSpeed's _parse_hostfile accepts).
hostfile_hosts() {
    sed -n -E 's/^[[:space:]]*([^#[:space:]][^[:space:]]*)[[:space:]]+slots=[0-9]+.*$/\1/p' "$1"
}

# The .deepspeed_env files DeepSpeed reads: $DS_ENV_FILE (default .deepspeed_env) in ~ and in the current
# directory, joined like os.path.join (an absolute DS_ENV_FILE is read as it is).
deepspeed_env_files() {
    local name=${DS_ENV_FILE:-.deepspeed_env} home=~ dir
    for dir in "$home" "$PWD"; do
        if [[ $name == /* ]]; then
            [[ -f $name ]] && echo "$name"
        else
            [[ -f $dir/$name ]] && echo "$dir/$name"
        fi
    done | awk '!seen[$0]++'
}

# Refuse secrets in .deepspeed_env; in the multi-node mode (the only one where DeepSpeed reads the file)
# also refuse lines it would mangle: it splits each line at '=' and pastes `export KEY=VALUE;` into a shell
# command, so a comment or blank line breaks the launch and a '#' line swallows the rest of the command.
check_deepspeed_env() { # MODE
    local file line key lineno
    while IFS= read -r file; do
        lineno=0
        while IFS= read -r line || [[ -n $line ]]; do
            lineno=$((lineno + 1))
            key=${line%%=*}
            key=${key//[[:space:]]/}
            if is_secret_name "$key"; then
                die "$file:$lineno sets $key, a secret. DeepSpeed's pdsh runner pastes every .deepspeed_env \
variable into the remote command line and logs that command. Remove it from $file and give the ranks \
the token another way: \`hf auth login\` on every node (writes the token file \$HF_HOME/token, default \
~/.cache/huggingface/token), a token file on every node with HF_TOKEN_PATH naming it (HF_TOKEN_PATH itself \
may go in .deepspeed_env), or HF_TOKEN in each node's own environment with the per-node mode \
(--node-rank ..., no ssh)."
            fi
            if [[ $1 == multi && ! $line =~ ^[[:space:]]*[A-Za-z_][A-Za-z0-9_]*= ]]; then
                die "$file:$lineno is not NAME=VALUE: DeepSpeed reads every line of .deepspeed_env as one \
variable (no comments, no blank lines) and would break the remote command"
            fi
        done <"$file"
    done < <(deepspeed_env_files)
}

# In the multi-node mode DeepSpeed exports some variables of this environment to every host on the
# command line (PDSH_EXPORTED_PREFIXES): refuse the secret ones.
check_exported_env() {
    local name prefix
    while IFS= read -r name; do
        for prefix in "${PDSH_EXPORTED_PREFIXES[@]}"; do
            if [[ $name == "$prefix"* ]] && is_secret_name "$name"; then
                die "$name is exported, and DeepSpeed's pdsh runner copies every $prefix* variable into the \
remote command line and logs it. Unset it here and set it on each node instead (a file the ranks read, \
or the node's own environment)."
            fi
        done
    done < <(compgen -e)
}

# DeepSpeed logs the full command: no secret may ride on it as an override or a value.
check_args() {
    local arg key
    for arg in "$@"; do
        if [[ $arg =~ $HF_TOKEN_VALUE_RE ]]; then
            die "an argument holds what looks like a Hugging Face token (hf_...): DeepSpeed logs the full \
command line. Use \`hf auth login\` or HF_TOKEN in the environment of the ranks instead."
        fi
        if [[ $arg == *=* ]]; then
            key=${arg%%=*}
            if [[ ${key,,} =~ $SECRET_ARG_RE ]]; then
                die "the override '$key=...' passes a secret on the command line, which DeepSpeed logs. \
Give it to the ranks through their environment or a file instead."
            fi
        fi
    done
}

# GPUs on this node for a generated hostfile: CUDA_VISIBLE_DEVICES, else nvidia-smi.
detect_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

num_gpus="" hostfile="" num_nodes="" master_addr="" master_port=$DEFAULT_MASTER_PORT
node_rank="" nnodes="" ssh_port=${MEGAMOE_SSH_PORT:-} script="" dry_run=0
ds_extra=()
while (($# > 0)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run) dry_run=1 ;;
        --num-gpus | --hostfile | --num-nodes | --master-addr | --master-port | --node-rank | --nnodes | \
            --ssh-port | --script | --ds-arg)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --num-gpus) num_gpus=$2 ;;
                --hostfile) hostfile=$2 ;;
                --num-nodes) num_nodes=$2 ;;
                --master-addr) master_addr=$2 ;;
                --master-port) master_port=$2 ;;
                --node-rank) node_rank=$2 ;;
                --nnodes) nnodes=$2 ;;
                --ssh-port) ssh_port=$2 ;;
                --script) script=$2 ;;
                --ds-arg) ds_extra+=("$2") ;;
            esac
            shift
            ;;
        --*=*)
            # --option=value: split and parse again.
            opt=${1%%=*} val=${1#*=}
            shift
            set -- "$opt" "$val" "$@"
            continue
            ;;
        --)
            shift
            break
            ;;
        -*) die "unknown option $1 (see --help; arguments of megamoe train go after --)" ;;
        *) break ;;
    esac
    shift
done
train_args=("$@")

for pair in "--num-gpus:$num_gpus" "--num-nodes:$num_nodes" "--master-port:$master_port" \
    "--node-rank:$node_rank" "--nnodes:$nnodes" "--ssh-port:$ssh_port"; do
    [[ -z ${pair#*:} ]] || require_int "${pair%%:*}" "${pair#*:}"
done
[[ -z $hostfile || -f $hostfile ]] || die "hostfile $hostfile does not exist"
[[ -z $script || -f $script ]] || die "script $script does not exist"
((${#train_args[@]} > 0)) || [[ -n $script ]] || die "no run config given (see --help)"

if [[ -n $node_rank ]]; then
    mode=per-node
elif [[ -n $hostfile ]]; then
    mode=multi
else
    mode=single
fi

cmd=(deepspeed)
case $mode in
    single)
        [[ -z $nnodes ]] || die "--nnodes belongs to the per-node mode: add --node-rank and --master-addr"
        [[ -z $num_nodes ]] || die "--num-nodes needs --hostfile"
        if [[ -n $num_gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
            die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES is set, and DeepSpeed ignores it when --num_gpus is \
given (it would use devices 0..$((num_gpus - 1))). Drop --num-gpus to use exactly the visible devices."
        fi
        [[ -z $num_gpus ]] || cmd+=(--num_gpus "$num_gpus")
        cmd+=(--master_port "$master_port")
        ;;
    multi)
        [[ -z $nnodes ]] || die "--nnodes belongs to the per-node mode; with a hostfile use --num-nodes"
        cmd+=(--hostfile "$hostfile")
        [[ -z $num_nodes ]] || cmd+=(--num_nodes "$num_nodes")
        [[ -z $num_gpus ]] || cmd+=(--num_gpus "$num_gpus")
        [[ -z $master_addr ]] || cmd+=(--master_addr "$master_addr")
        cmd+=(--master_port "$master_port")
        [[ -z $ssh_port ]] || cmd+=(--ssh_port "$ssh_port")
        check_exported_env
        ;;
    per-node)
        [[ -n $master_addr ]] || die "the per-node mode needs --master-addr (the address of node 0)"
        [[ -z $num_nodes ]] || die "--num-nodes belongs to the multi-node mode; per node use --nnodes"
        if [[ -n $hostfile ]]; then
            hosts=$(hostfile_hosts "$hostfile" | wc -l)
            ((hosts > 0)) || die "$hostfile lists no 'HOST slots=N' line"
            [[ -z $nnodes || $nnodes -eq $hosts ]] || die "--nnodes $nnodes but $hostfile lists $hosts hosts"
            nnodes=$hosts
        else
            [[ -n $nnodes ]] || die "the per-node mode needs --nnodes (or a --hostfile listing the nodes)"
            ((node_rank < nnodes)) || die "--node-rank $node_rank is not in [0, $nnodes)"
            slots=${num_gpus:-$(detect_gpus)}
            ((slots > 0)) || die "found no GPU on this node: pass --num-gpus N (on CPU, N ranks)"
            # With --no_ssh the host names are labels: every node must pass the same list (world_info),
            # and node R takes the slots of line R. Same content => same name, so concurrent nodes agree.
            hostfile=${TMPDIR:-/tmp}/megamoe-hostfile.$(id -u).${nnodes}x$slots
            hostfile_text=$(for ((i = 0; i < nnodes; i++)); do echo "node-$i slots=$slots"; done)
            num_gpus="" # the slots already say it
        fi
        ((node_rank < nnodes)) || die "--node-rank $node_rank is not in [0, $nnodes)"
        # With a hostfile DeepSpeed sets CUDA_VISIBLE_DEVICES=0..slots-1 on every node, whatever it was.
        if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != "$(seq -s, 0 $(($(detect_gpus) - 1)))" ]]; then
            die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES, but with --no_ssh and a hostfile DeepSpeed runs node \
ranks on devices 0..N-1. Give the job whole nodes or devices numbered from 0 (Slurm's ConstrainDevices, a \
container with only its GPUs)."
        fi
        cmd+=(--hostfile "$hostfile" --no_ssh --node_rank "$node_rank")
        [[ -z $num_gpus ]] || cmd+=(--num_gpus "$num_gpus")
        cmd+=(--master_addr "$master_addr" --master_port "$master_port")
        ;;
esac

check_deepspeed_env "$mode"
check_args "${train_args[@]}"

if [[ -n ${hostfile_text:-} ]]; then
    if ((dry_run)); then
        note "would write $hostfile:"$'\n'"$hostfile_text"
    else # atomically: nodes sharing a /tmp (or one host running two) may write it at the same time
        tmp=$(mktemp "$hostfile.XXXXXX")
        echo "$hostfile_text" >"$tmp"
        mv -f "$tmp" "$hostfile"
    fi
fi

cmd+=("${ds_extra[@]}")
# --no_local_rank: ranks read LOCAL_RANK from the environment; a `--local_rank=N` argument would land
# between `megamoe` and its subcommand.
cmd+=(--no_local_rank)
if [[ -n $script ]]; then
    cmd+=("$script")
else
    cmd+=(--module megamoe train)
fi
cmd+=("${train_args[@]}")

printf -v shown ' %q' "${cmd[@]}"
shown=${shown# }
if ((dry_run)); then
    echo "$shown"
    exit 0
fi
command -v deepspeed >/dev/null 2>&1 || die "deepspeed is not on PATH (activate the environment first)"
note "[$mode] $shown"
# DeepSpeed's runner passes a signal on to its ranks only in the pdsh mode: a SIGTERM to it (Kubernetes and
# `docker stop` signal only the container's first process) would leave launcher and ranks running. So
# run it in a process group of its own and send TERM to the whole group on TERM / INT / HUP.
setsid "${cmd[@]}" &
launcher=$!
trap 'kill -TERM -- "-$launcher" 2>/dev/null || true' TERM INT HUP
status=0
wait "$launcher" || status=$?
while kill -0 "$launcher" 2>/dev/null; do # a trapped signal ends `wait` early: wait for the group's exit
    status=0
    wait "$launcher" || status=$?
done
exit "$status"
