#!/usr/bin/env bash
# Apply timm-st's train.py patch (generic --task / --task-kwargs options) to a timm checkout.
#
#   patches/apply.sh PATH_TO_TIMM_CHECKOUT
#
# PATH_TO_TIMM_CHECKOUT is a clone of https://github.com/huggingface/pytorch-image-models (or any
# directory holding timm's train.py). The patch is checked with `git apply --check` first; nothing
# is changed unless it applies cleanly. Running it on an already patched train.py does nothing.
set -euo pipefail

PATCH_COMMIT=aa4b5850c1543fa488abf260f18390eda46cf85d
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch="$here/train_task_option.patch"

die() { echo "apply.sh: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 PATH_TO_TIMM_CHECKOUT (a pytorch-image-models clone, the folder holding train.py)"
checkout="$1"
[ -d "$checkout" ] || die "$checkout is not a directory"
[ -f "$checkout/train.py" ] || die "no train.py in $checkout; pass the root of a pytorch-image-models clone"
[ -f "$patch" ] || die "patch file $patch is missing"
command -v git >/dev/null || die "git is needed (git apply); install git"

cd "$checkout"
# outside a git work tree, git apply patches files relative to the current directory; inside one,
# paths are relative to its top, so the checkout must be that top
if top="$(git rev-parse --show-toplevel 2>/dev/null)"; then
    [ "$(cd "$top" && pwd -P)" = "$(pwd -P)" ] || die "$checkout is inside the git work tree $top but is not its top; pass the repository root"
    head="$(git rev-parse HEAD 2>/dev/null || true)"
    if [ -n "$head" ] && [ "$head" != "$PATCH_COMMIT" ]; then
        echo "apply.sh: note: checkout is at $head; the patch was written for $PATCH_COMMIT (trying anyway)" >&2
    fi
fi

if git apply --check --reverse "$patch" 2>/dev/null; then
    echo "apply.sh: $checkout/train.py already has the patch; nothing to do"
    exit 0
fi
if ! err="$(git apply --check "$patch" 2>&1)"; then
    echo "$err" >&2
    die "the patch does not apply cleanly to $checkout/train.py (written for timm commit $PATCH_COMMIT, v1.0.28-14). \
Check out that commit (git -C $checkout checkout $PATCH_COMMIT -- train.py), or use the no-patch route \
(device_modules: [timm_st.commands.hook]) if your train.py is supported, or run the recipe with timm-st train."
fi
git apply "$patch"
echo "apply.sh: patched $checkout/train.py (adds --task and --task-kwargs)"
echo "apply.sh: run stimulative recipes with: python train.py --config RECIPE.yaml --task timm_st.commands.hook:create_task ..."
