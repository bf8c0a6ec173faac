#!/usr/bin/env bash
# Make this Linux PC (or WSL2) a swarm node: check the prerequisites, install the C++ compiler
# and Python headers DeepSpeed builds its ops with (apt-get or dnf, as root or through sudo),
# install swarm with the cluster's pinned versions into a virtual environment, and install
# the node agent as a systemd user service. Safe to run again: steps already done are
# skipped, and a second run that finds nothing to change says so.
#
#   launcher/bootstrap.sh                  # from a checkout of swarm, on every PC
#   launcher/bootstrap.sh --help           # flags and environment variables
#
# Versions come from launcher/constraints.txt in the source tree, the same file the Docker
# image installs from, so a bootstrapped PC and a container run the same packages.

set -euo pipefail

usage() {
  cat <<'EOF'
usage: bootstrap.sh [options]

  --source DIR       swarm source tree to install (default: the checkout holding this script)
  --venv DIR         virtual environment to create (default: $SWARM_HOME/venv)  [SWARM_VENV]
  --python PYTHON    interpreter for the venv (default: python3)                [SWARM_PYTHON]
  --torch-index URL  pip index for torch only, e.g. https://download.pytorch.org/whl/cpu for
                     a CPU-only PC; the version still comes from constraints.txt [SWARM_TORCH_INDEX]
  --pip-args ARGS    extra arguments for every pip install, e.g.
                     "--no-index --find-links /mnt/wheels" for a PC without internet [SWARM_PIP_ARGS]
  --min-disk-gb N    free space needed where the venv goes (default: 20)   [SWARM_MIN_DISK_GB]
  --require-gpu      fail when no NVIDIA driver is found (default: warn, CPU-only node)
  --no-service       install the unit file but do not enable or start it
  --firewall CLUSTER as root: install nftables rules so that only the PCs of the cluster file
                     reach this PC's swarm, Ray and training ports (PyTorch's store and Gloo /
                     NCCL accept anyone otherwise); see 'swarm firewall --help'
  -h, --help         show this help

$SWARM_HOME (default ~/.swarm) is the state folder that holds the cluster secret.
A C++ compiler, the Python headers and libaio's (DeepSpeed compiles its ops on every PC) are
installed when missing: g++, pythonX.Y-dev and libaio-dev with apt-get, gcc-c++,
pythonX.Y-devel and libaio-devel with dnf, as root or through sudo.
Exit status: 0 when the PC is set up, 2 when a prerequisite is missing.
EOF
}

# ---- settings ---------------------------------------------------------------------------

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE_DIR=$(dirname "$SCRIPT_DIR")
STATE_DIR=${SWARM_HOME:-$HOME/.swarm}
VENV=${SWARM_VENV:-}
PYTHON=${SWARM_PYTHON:-python3}
TORCH_INDEX=${SWARM_TORCH_INDEX:-}
PIP_ARGS=${SWARM_PIP_ARGS:-}
MIN_DISK_GB=${SWARM_MIN_DISK_GB:-20}
REQUIRE_GPU=0
START_SERVICE=1
FIREWALL=

CHANGED=0   # set by every step that changed something; 0 at the end means "nothing to do"

say() { printf '%s\n' "$*"; }
ok() { say "ok: $*"; }
changed() { CHANGED=1; say "changed: $*"; }
warn() { say "warning: $*" >&2; }
die() { say "error: $*" >&2; exit 2; }

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --source) need_value "$@"; SOURCE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --torch-index) need_value "$@"; TORCH_INDEX=$2; shift 2 ;;
    --pip-args) need_value "$@"; PIP_ARGS=$2; shift 2 ;;
    --min-disk-gb) need_value "$@"; MIN_DISK_GB=$2; shift 2 ;;
    --require-gpu) REQUIRE_GPU=1; shift ;;
    --no-service) START_SERVICE=0; shift ;;
    --firewall) need_value "$@"; FIREWALL=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ $MIN_DISK_GB =~ ^[0-9]+$ ]] || die "--min-disk-gb wants a whole number of GB, not '$MIN_DISK_GB'"
VENV=${VENV:-$STATE_DIR/venv}
# Absolute paths: they end up in the unit file and in the stamp that decides re-installs.
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
VENV=$(abspath "$VENV")
STATE_DIR=$(abspath "$STATE_DIR")
SOURCE_DIR=$(cd "$SOURCE_DIR" 2>/dev/null && pwd) || die "source tree $SOURCE_DIR does not exist"
# The unit file cannot carry these paths safely (systemd splits on spaces, expands %).
for path in "$VENV" "$STATE_DIR"; do
  [[ $path =~ [[:space:]%\"\\\&] ]] && die "path '$path' contains a space, %, &, quote or backslash; choose another with --venv / SWARM_HOME"
done

# From here on every path is absolute. Work from / so that no Python started below finds
# modules or package metadata in the caller's folder (python -c and -m put it on sys.path).
cd /

CONSTRAINTS=$SOURCE_DIR/launcher/constraints.txt
UNIT_TEMPLATE=$SOURCE_DIR/launcher/swarm-agent.service
UNIT_NAME=swarm-agent.service
UNIT_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
STAMP=$VENV/.swarm-bootstrap
export PIP_DISABLE_PIP_VERSION_CHECK=1   # its notice would read like a problem with swarm

# ---- prerequisites (nothing is changed until all of them pass) ---------------------------

[[ $(uname -s) == Linux ]] || die "bootstrap.sh runs on Linux or WSL2; this is $(uname -s)"
for f in pyproject.toml swarm/__init__.py launcher/constraints.txt launcher/swarm-agent.service; do
  [[ -f $SOURCE_DIR/$f ]] || die "$SOURCE_DIR is not a swarm source tree ($f is missing); pass --source"
done
for tool in sha256sum df awk sed mktemp; do
  command -v "$tool" >/dev/null || die "$tool not found; install coreutils, gawk/mawk and sed"
done

# Python: the supported range is pyproject.toml's requires-python (">=A.B,<C.D"), read here so
# that it is written down once.
spec=$(sed -n 's/^requires-python *= *"\(.*\)"/\1/p' "$SOURCE_DIR/pyproject.toml")
[[ $spec =~ ^\>=([0-9]+)\.([0-9]+),\<([0-9]+)\.([0-9]+)$ ]] \
  || die "cannot read requires-python '$spec' in pyproject.toml (expected \">=A.B,<C.D\")"
py_min=$((BASH_REMATCH[1] * 100 + BASH_REMATCH[2]))
py_max=$((BASH_REMATCH[3] * 100 + BASH_REMATCH[4]))

PYTHON_PATH=$(command -v "$PYTHON" 2>/dev/null) \
  || die "$PYTHON not found; install Python ${spec} (Debian/Ubuntu: sudo apt install python3 python3-venv) or pass --python PATH"
PY_VERSION=$("$PYTHON_PATH" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) \
  || die "$PYTHON_PATH does not run; pass a working interpreter with --python PATH"
[[ $PY_VERSION =~ ^([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "$PYTHON_PATH reports version '$PY_VERSION'"
py_have=$((BASH_REMATCH[1] * 100 + BASH_REMATCH[2]))
if ((py_have < py_min || py_have >= py_max)); then
  die "$PYTHON_PATH is Python $PY_VERSION; swarm needs Python $spec (pass another with --python PATH)"
fi
ok "Python $PY_VERSION ($PYTHON_PATH)"

# NVIDIA driver. WSL2 puts nvidia-smi in /usr/lib/wsl/lib, which is not always on PATH.
NVIDIA_SMI=$(command -v nvidia-smi 2>/dev/null || true)
[[ -z $NVIDIA_SMI && -x /usr/lib/wsl/lib/nvidia-smi ]] && NVIDIA_SMI=/usr/lib/wsl/lib/nvidia-smi
DRIVER_CUDA=""
if [[ -n $NVIDIA_SMI ]] && gpus=$("$NVIDIA_SMI" --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null) && [[ -n $gpus ]]; then
  # The banner's "CUDA Version: X.Y" is the newest CUDA this driver runs; torch is checked against it below.
  DRIVER_CUDA=$("$NVIDIA_SMI" 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1)
  ok "NVIDIA driver: $(printf '%s' "$gpus" | tr '\n' ';' | sed 's/;$//; s/;/; /g')${DRIVER_CUDA:+ (CUDA $DRIVER_CUDA)}"
elif ((REQUIRE_GPU)); then
  why="nvidia-smi not found"
  [[ -n $NVIDIA_SMI ]] && why="nvidia-smi failed"
  die "no working NVIDIA driver ($why); install the driver, or drop --require-gpu for a CPU-only node"
else
  hint=""
  [[ -z $TORCH_INDEX ]] && hint="; in an all-CPU swarm, --torch-index https://download.pytorch.org/whl/cpu on every PC skips the multi-GB CUDA build of torch"
  warn "no NVIDIA driver found (nvidia-smi); this PC joins as a CPU-only node$hint"
fi

# Build tools: DeepSpeed compiles its CPU Adam, AIO and CPU collective ops on every PC (torch's
# cpp_extension runs $CXX, else c++, and includes Python.h; the AIO op includes libaio.h);
# installed as root or through sudo.
PY_MINOR=${PY_VERSION%.*}
PY_INCLUDE=$("$PYTHON_PATH" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) || PY_INCLUDE=
if command -v apt-get >/dev/null 2>&1; then
  PKG_TOOL=apt-get CXX_PKG=g++ PY_DEV_PKG=python$PY_MINOR-dev AIO_PKG=libaio-dev
elif command -v dnf >/dev/null 2>&1; then
  PKG_TOOL=dnf CXX_PKG=gcc-c++ PY_DEV_PKG=python$PY_MINOR-devel AIO_PKG=libaio-devel
else
  PKG_TOOL='' CXX_PKG="a C++ compiler" PY_DEV_PKG="the Python $PY_MINOR headers" AIO_PKG="the libaio headers"
fi
has_libaio() {  # libaio.h where the compiler looks (swarm.hardware.include_dirs): NVMe offload's op includes it
  local dir dirs
  IFS=: read -ra dirs <<< "${CPATH:-}:${C_INCLUDE_PATH:-}:${CPLUS_INCLUDE_PATH:-}"
  for dir in "${dirs[@]}" /usr/local/include /usr/include; do
    [[ -n $dir && -f $dir/libaio.h ]] && return 0
  done
  return 1
}
build_needs() {  # what is missing, as this distribution's packages, one a line
  command -v "${CXX:-c++}" >/dev/null 2>&1 || printf '%s\n' "$CXX_PKG"
  [[ -n $PY_INCLUDE && -f $PY_INCLUDE/Python.h ]] || printf '%s\n' "$PY_DEV_PKG"
  has_libaio || printf '%s\n' "$AIO_PKG"
}
mapfile -t needs < <(build_needs)
if ((${#needs[@]} == 0)); then
  ok "C++ compiler ($(command -v "${CXX:-c++}")) and Python $PY_MINOR headers, and libaio's, for DeepSpeed's ops"
else
  why="DeepSpeed compiles its CPU Adam and AIO ops on every PC"
  missing=$(printf '%s, ' "${needs[@]}")
  [[ -n $PKG_TOOL ]] \
    || die "missing: ${missing%, } ($why); install them with this system's package manager, then run this again"
  as_root=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1 || ! { [[ -t 0 ]] || sudo -n true 2>/dev/null; }; then
      die "missing: ${missing%, } ($why); install them with 'sudo $PKG_TOOL install ${needs[*]}', then run this again"
    fi
    as_root=(sudo)
  fi
  say "installing ${needs[*]} with $PKG_TOOL: $why"
  install_build_tools() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive "$PKG_TOOL" install -y "${needs[@]}"; }
  # A fresh Debian/Ubuntu may have no package lists yet: apt-get update, and once more.
  install_build_tools || { [[ $PKG_TOOL == apt-get ]] && "${as_root[@]}" apt-get update && install_build_tools; } \
    || die "$PKG_TOOL could not install ${needs[*]} (see above); install them, then run this again"
  mapfile -t still < <(build_needs)
  ((${#still[@]} == 0)) || die "${still[*]} still missing after '$PKG_TOOL install'; install it, then run this again"
  changed "installed ${needs[*]} ($PKG_TOOL), for DeepSpeed's ops"
fi

# ---- what the venv should contain ------------------------------------------------------

# The stamp lists everything that decides what gets installed: the interpreter, the torch
# index (CUDA or CPU build), and the hash of every file copied from the source tree. The venv
# is reinstalled when any of them changes, and left alone when none does. --pip-args is not in
# it: it says where packages come from, not which ones.
SOURCE_FILES=(pyproject.toml launcher/constraints.txt)
[[ -f $SOURCE_DIR/README.md ]] && SOURCE_FILES+=(README.md)
while IFS= read -r -d '' f; do SOURCE_FILES+=("${f#"$SOURCE_DIR"/}"); done \
  < <(find "$SOURCE_DIR/swarm" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z)
want_stamp() {
  printf 'python %s\ntorch-index %s\n' "$PY_VERSION" "${TORCH_INDEX:-default}"
  (cd "$SOURCE_DIR" && sha256sum -- "${SOURCE_FILES[@]}")
}
WANT_STAMP=$(want_stamp)

venv_current() {
  [[ -x $VENV/bin/swarm && -f $STAMP ]] && [[ $(cat "$STAMP") == "$WANT_STAMP" ]] \
    && "$VENV/bin/swarm" --version >/dev/null 2>&1
}

if [[ -x $VENV/bin/python ]]; then
  venv_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo broken)
  [[ $venv_py == "$PY_VERSION" ]] \
    || die "$VENV holds Python $venv_py, not $PY_VERSION from $PYTHON_PATH; remove it (rm -rf $VENV) or pass --venv DIR"
fi

INSTALLED=0
if venv_current; then
  ok "$("$VENV/bin/swarm" --version) in $VENV is up to date"
else
  # Free disk, checked only when something will be installed: torch with CUDA alone is ~5 GB.
  probe=$VENV
  while [[ ! -d $probe ]]; do probe=$(dirname "$probe"); done
  free_kb=$(df -Pk "$probe" | awk 'NR == 2 { print $4 }')
  ((free_kb >= MIN_DISK_GB * 1024 * 1024)) \
    || die "only $((free_kb / 1024 / 1024)) GB free at $probe; the install needs ${MIN_DISK_GB} GB (free some space, or pass --venv DIR on a bigger disk)"
  ok "$((free_kb / 1024 / 1024)) GB free at $probe"

  if [[ ! -x $VENV/bin/python ]]; then
    [[ ! -e $VENV || -z $(ls -A "$VENV") ]] \
      || die "$VENV exists and is not a virtual environment; pass --venv with a new folder"
    "$PYTHON_PATH" -c 'import venv, ensurepip' 2>/dev/null \
      || die "Python $PY_VERSION has no venv module; install it (Debian/Ubuntu: sudo apt install python${PY_VERSION%.*}-venv)"
  fi
  if [[ ! -d $STATE_DIR ]]; then
    # Private like the secret it will hold (swarm init would make it so too).
    mkdir -p "$(dirname "$STATE_DIR")"
    mkdir -m 700 "$STATE_DIR"
    changed "created state folder $STATE_DIR"
  fi
  if [[ ! -x $VENV/bin/python ]]; then
    mkdir -p "$VENV"
    "$PYTHON_PATH" -m venv "$VENV" || { rm -rf "$VENV"; die "$PYTHON_PATH -m venv $VENV failed (see above)"; }
    changed "created virtual environment $VENV (Python $PY_VERSION)"
  fi

  read -r -a pip_extra <<<"$PIP_ARGS"
  pip=("$VENV/bin/python" -m pip install --constraint "$CONSTRAINTS" "${pip_extra[@]}")
  # torch first and on its own: --torch-index must apply to torch alone, and the rest of the
  # install then finds the pinned torch already there instead of picking a build itself.
  if [[ -n $TORCH_INDEX ]]; then
    "${pip[@]}" --index-url "$TORCH_INDEX" torch
  else
    "${pip[@]}" torch
  fi
  # Install from a copy: pip builds in the source folder, which may be read-only or shared.
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  for f in "${SOURCE_FILES[@]}"; do
    mkdir -p "$stage/$(dirname "$f")"
    cp "$SOURCE_DIR/$f" "$stage/$f"
  done
  "${pip[@]}" "$stage"
  if ! conflicts=$("$VENV/bin/python" -m pip check 2>&1); then
    printf '%s\n' "$conflicts" >&2
    die "pip check found conflicting packages in $VENV (listed above); launcher/constraints.txt and pyproject.toml disagree"
  fi
  "$VENV/bin/swarm" --version >/dev/null || die "$VENV/bin/swarm does not run after the install"
  printf '%s\n' "$WANT_STAMP" >"$STAMP"
  INSTALLED=1
  changed "installed $("$VENV/bin/swarm" --version) into $VENV"
fi

# torch's CUDA build needs a driver at least that new; say so now rather than at the first step.
if [[ -n $DRIVER_CUDA ]]; then
  torch_cuda=$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
  if [[ -n $torch_cuda && ${torch_cuda%%.*} -gt ${DRIVER_CUDA%%.*} ]]; then
    msg="torch is built for CUDA $torch_cuda but the NVIDIA driver supports CUDA $DRIVER_CUDA; update the driver"
    ((REQUIRE_GPU)) && die "$msg"
    warn "$msg (until then this PC trains on CPU only)"
  fi
fi

# ---- `swarm` on PATH ---------------------------------------------------------------------

LINK=$HOME/.local/bin/swarm
if [[ -L $LINK && $(readlink "$LINK") == "$VENV/bin/swarm" ]]; then
  ok "$LINK points to the venv"
elif [[ -e $LINK && ! -L $LINK ]]; then
  warn "$LINK exists and is not a link; left alone (run $VENV/bin/swarm, or remove it and run again)"
else
  mkdir -p "$(dirname "$LINK")"
  ln -sfn "$VENV/bin/swarm" "$LINK"
  changed "linked $LINK -> $VENV/bin/swarm"
fi

# ---- the agent's systemd user unit -------------------------------------------------------

# The unit in launcher/ assumes default paths; this copy runs this venv's swarm, with this
# state folder. Only the command of ExecStart is replaced (its arguments stay), and
# SWARM_HOME is set at the end of [Service] so that it wins over any earlier Environment=.
render_unit() {
  awk -v exe="$VENV/bin/swarm" -v home="$STATE_DIR" '
    function add_env() { print "# set by launcher/bootstrap.sh for this PC"; print "Environment=SWARM_HOME=" home }
    function flush() { printf "%s", blanks; blanks = "" }
    /^\[/ { if (in_service) add_env(); flush(); in_service = ($0 == "[Service]"); print; next }
    in_service && /^[ \t]*$/ { blanks = blanks "\n"; next }  # kept to go after our lines
    in_service && /^ExecStart=/ {
      flush()
      cmd = substr($0, length("ExecStart=") + 1)
      sub(/^[^ \t]+/, exe, cmd)
      print "ExecStart=" cmd
      next
    }
    { flush(); print }
    END { if (in_service) add_env(); flush() }
  ' "$UNIT_TEMPLATE"
}
UNIT=$UNIT_DIR/$UNIT_NAME
WANT_UNIT=$(render_unit)
grep -q '^ExecStart=' <<<"$WANT_UNIT" || die "$UNIT_TEMPLATE has no ExecStart= line"
UNIT_CHANGED=0
if [[ -f $UNIT ]] && [[ $(sha256sum <"$UNIT") == $(printf '%s\n' "$WANT_UNIT" | sha256sum) ]]; then
  ok "$UNIT is up to date"
else
  mkdir -p "$UNIT_DIR"
  printf '%s\n' "$WANT_UNIT" >"$UNIT.tmp"
  mv "$UNIT.tmp" "$UNIT"
  UNIT_CHANGED=1
  changed "wrote $UNIT"
fi

HAVE_SECRET=0
[[ -f $STATE_DIR/secret ]] && HAVE_SECRET=1
RUN_AGENT="$VENV/bin/swarm agent"
[[ $STATE_DIR != "$HOME/.swarm" ]] && RUN_AGENT="SWARM_HOME=$STATE_DIR $RUN_AGENT"

if ((!START_SERVICE)); then
  say "note: --no-service: start the agent yourself with: $RUN_AGENT"
elif ! systemctl --user show-environment >/dev/null 2>&1; then
  hint="start the agent yourself with: $RUN_AGENT"
  grep -qi microsoft /proc/version 2>/dev/null \
    && hint="on WSL2, add '[boot] systemd=true' to /etc/wsl.conf and run 'wsl --shutdown' in Windows, then run this again; or $hint"
  say "note: systemd --user is not available here; $hint"
else
  if ((UNIT_CHANGED)); then
    systemctl --user daemon-reload || die "systemctl --user daemon-reload failed"
  fi
  if systemctl --user is-enabled --quiet "$UNIT_NAME"; then
    ok "$UNIT_NAME is enabled"
  else
    systemctl --user enable "$UNIT_NAME" >/dev/null 2>&1 || die "systemctl --user enable $UNIT_NAME failed; try it by hand to see why"
    changed "enabled $UNIT_NAME (starts at login)"
  fi
  if systemctl --user is-active --quiet "$UNIT_NAME"; then
    if ((UNIT_CHANGED || INSTALLED)); then
      systemctl --user restart "$UNIT_NAME" || die "$UNIT_NAME did not restart; see: journalctl --user -u $UNIT_NAME"
      changed "restarted $UNIT_NAME with the new install"
    else
      ok "$UNIT_NAME is running"
    fi
  elif ((HAVE_SECRET)); then
    systemctl --user start "$UNIT_NAME" || die "$UNIT_NAME did not start; see: journalctl --user -u $UNIT_NAME"
    changed "started $UNIT_NAME"
  else
    # The agent refuses to run without the secret; starting it now would only make it fail.
    say "note: $UNIT_NAME starts once the secret is in place: systemctl --user start $UNIT_NAME"
  fi
  if [[ $(loginctl show-user "$(id -un)" --property=Linger --value 2>/dev/null || true) == no ]]; then
    say "note: to keep the agent running when nobody is logged in: sudo loginctl enable-linger $(id -un)"
  fi
fi

# ---- the firewall (root only) ------------------------------------------------------------

# The agent runs as the user and cannot install rules; the one who runs this as root can.
if [[ -n $FIREWALL ]]; then
  [[ -f $FIREWALL ]] || die "--firewall: cluster file $FIREWALL does not exist"
  [[ $(id -u) -eq 0 ]] || die "--firewall needs root (nftables); run 'sudo $VENV/bin/swarm firewall $FIREWALL --apply' instead"
  command -v nft >/dev/null || die "--firewall needs nft (Debian/Ubuntu: apt install nftables)"
  "$VENV/bin/swarm" firewall "$FIREWALL" --apply || die "the firewall rules were not installed (see above)"
  changed "nftables table inet swarm: only the PCs of $FIREWALL reach the swarm's ports"
fi

# ---- next step ---------------------------------------------------------------------------

if ((CHANGED)); then
  say "done: this PC is set up ($("$VENV/bin/swarm" --version), $VENV)"
else
  say "nothing to do: this PC is already set up ($("$VENV/bin/swarm" --version), $VENV)"
fi
case :$PATH: in *:"$HOME/.local/bin":*) ;; *) say "note: add ~/.local/bin to PATH to run 'swarm' by name" ;; esac
if ((HAVE_SECRET)); then
  say "next: on the head PC run 'swarm up CLUSTER.yaml', then 'swarm status' to see every PC and its versions"
else
  say "next: on the head PC run 'swarm init'; on every other PC copy the head's secret to $STATE_DIR/secret with mode 0600 (e.g. scp HEAD-PC:.swarm/secret $STATE_DIR/ && chmod 600 $STATE_DIR/secret)"
fi
