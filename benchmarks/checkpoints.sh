#!/usr/bin/env bash
# Resumable training checkpoints live on the git branch `checkpoints`, not in main's tree: they are large (tens
# of MB each) and a device machine is sent main's working tree, which must stay under 64 MiB. The branch holds
# one file per checkpoint (replaced in its tree; git history keeps every saved version, like any commit);
# main's training READMEs say which. The branch lives in this repository beside main (push it with main).
#
#   bash benchmarks/checkpoints.sh list
#   bash benchmarks/checkpoints.sh restore PATH_ON_BRANCH FILE     # refuses to overwrite FILE
#   bash benchmarks/checkpoints.sh save FILE PATH_ON_BRANCH "message"
#
# `save` commits to the branch without touching the checkout, the index or the current branch.
set -euo pipefail
BRANCH=${MEDDIFF_CHECKPOINT_BRANCH:-checkpoints}
ref="refs/heads/$BRANCH"
die() { echo "checkpoints.sh: $*" >&2; exit 1; }
# a fresh clone has the branch as origin's only: read from there (and save on top of it)
from=$ref
if ! git rev-parse -q --verify "$ref" >/dev/null && git rev-parse -q --verify "refs/remotes/origin/$BRANCH" >/dev/null; then
  from="refs/remotes/origin/$BRANCH"
fi

case "${1:-}" in
  list)
    git rev-parse -q --verify "$from" >/dev/null || die "no branch $BRANCH yet"
    git ls-tree -r -l "$from" | awk '{printf "%10.1f MB  %s\n", $4 / 1e6, $5}'
    git log -1 --format='last saved %ci: %s' "$from"
    ;;
  restore)
    [ $# -eq 3 ] || die "usage: restore PATH_ON_BRANCH FILE"
    [ ! -e "$3" ] || die "$3 exists: not overwritten (move it away first)"
    git cat-file -e "$from:$2" 2>/dev/null || die "$2 is not on branch $BRANCH"
    mkdir -p "$(dirname "$3")"
    git cat-file blob "$from:$2" > "$3.part" && mv "$3.part" "$3"
    echo "restored $BRANCH:$2 -> $3 ($(du -h "$3" | cut -f1))"
    ;;
  save)
    [ $# -eq 4 ] || die "usage: save FILE PATH_ON_BRANCH MESSAGE"
    [ -f "$2" ] || die "$2 is not a file"
    [ "$(git symbolic-ref -q HEAD)" != "$ref" ] || die "$BRANCH is checked out: save from another branch"
    blob=$(git hash-object -w "$2")
    index=$(mktemp)
    trap 'rm -f "$index"' EXIT
    parent=() old=""
    if git rev-parse -q --verify "$from" >/dev/null; then
      [ "$from" = "$ref" ] && old=$(git rev-parse "$ref")
      GIT_INDEX_FILE=$index git read-tree "$from"
      parent=(-p "$(git rev-parse "$from")")
    else
      GIT_INDEX_FILE=$index git read-tree --empty
    fi
    GIT_INDEX_FILE=$index git update-index --add --cacheinfo "100644,$blob,$3"
    tree=$(GIT_INDEX_FILE=$index git write-tree)
    commit=$(git commit-tree "$tree" "${parent[@]}" -m "$4")
    git update-ref "$ref" "$commit" "$old"  # fails if another save moved the branch meanwhile
    echo "saved $2 -> $BRANCH:$3 ($(du -h "$2" | cut -f1)), commit ${commit:0:10}"
    ;;
  *)
    die "usage: list | restore PATH_ON_BRANCH FILE | save FILE PATH_ON_BRANCH MESSAGE"
    ;;
esac
