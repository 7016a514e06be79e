# Sourced by setup.sh, lock.sh and check_latest.sh: where uv takes torch's CPU build from, as uv
# arguments in TORCH_SOURCE. uv reads no pip configuration, so pip's find-links folders (where a
# machine keeps the CPU wheel, e.g. PIP_FIND_LINKS=/opt/wheels) are passed on; without one, the
# CPU wheels of PyTorch's own index (https://download.pytorch.org/whl/cpu), every other package
# from the default index at its pinned version. FISHERTUNE_TORCH_INDEX sets another index.
TORCH_SOURCE=()
_pip=$(command -v pip3 || command -v pip || true)
for _dir in ${PIP_FIND_LINKS:-} $( [ -n "$_pip" ] && "$_pip" config get global.find-links 2>/dev/null || true); do
    if compgen -G "$_dir/torch-*.whl" >/dev/null && [[ " ${TORCH_SOURCE[*]} " != *" $_dir "* ]]; then
        TORCH_SOURCE+=(--find-links "$_dir")
    fi
done
if [ -n "${FISHERTUNE_TORCH_INDEX:-}" ] || [ ${#TORCH_SOURCE[@]} = 0 ]; then
    TORCH_SOURCE=(--extra-index-url "${FISHERTUNE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
        --index-strategy unsafe-best-match)
fi
unset _pip _dir
