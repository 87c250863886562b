#!/usr/bin/env bash
# Resumable training checkpoints, kept outside git: in a store folder, runs/checkpoints/ at the repository's top
# (runs/ is in .gitignore) or the folder MEDDIFF_CHECKPOINTS names. Never in the repository: checkpoints are
# large (tens of MB each), every committed version stays in the history for good (it already weighs 385 MB), and a
# device machine is sent the working tree, which must stay under 64 MiB.
#
# Training resumes from a model folder through `training.init_from` (its UNet, steps and minutes), or from a
# checkpoint kept outside the repository: restore it into the run's work dir and train with --resume.
#
#   bash benchmarks/checkpoints.sh list
#   bash benchmarks/checkpoints.sh restore NAME FILE        # refuses to overwrite FILE
#   bash benchmarks/checkpoints.sh save FILE NAME "message"  # a copy in the store; replaces an earlier NAME
#
# Earlier versions of this script stored checkpoints in main's history (.checkpoints/NAME, added by one commit and
# removed by the next): `list` shows those too and `restore` still reads them; nothing is written there any more.
set -euo pipefail
DIR=.checkpoints  # where history holds the checkpoints of earlier versions (read only)
die() { echo "checkpoints.sh: $*" >&2; exit 1; }
top=$(git rev-parse --show-toplevel) || die "not inside a git checkout"
STORE=${MEDDIFF_CHECKPOINTS:-$top/runs/checkpoints}
check_name() {  # (the store keeps NAME.note beside NAME, and writes NAME.part first)
  [[ $1 =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ && /$1/ != */./* && /$1/ != */../* && $1 != *.note && $1 != *.part ]] \
    || die "bad checkpoint name '$1' (letters, digits, . _ - and /; not ending .note or .part)"
}
check_store() {  # a store inside the checkout must be ignored by git, so that no checkpoint can be committed
  local probe=$STORE/.probe
  case "$(realpath -m "$probe")/" in
    "$(realpath "$top")"/*) git -C "$top" check-ignore -q --no-index "$(realpath -m "$probe")" \
        || die "$STORE is inside the repository and not ignored by git: use runs/checkpoints or MEDDIFF_CHECKPOINTS" ;;
  esac
}
# exact paths from the repository's top, whatever the current folder (no globs, no folder prefixes)
spec() { echo ":(top,literal)$DIR/$1"; }
# the commit that last stored NAME in history (every parent of a merge is searched, not only the first)
stored_in() { git log -1 --full-history --no-renames --format=%H --diff-filter=A HEAD -- "$(spec "$1")"; }

list_store() {
  [ -d "$STORE" ] || return 0
  (cd "$STORE" && find . -type f ! -name '*.note' ! -name '*.part' | sed 's|^\./||' | sort) \
    | while IFS= read -r name; do
      note=$(cat "$STORE/$name.note" 2>/dev/null || true)
      awk -v s="$(wc -c < "$STORE/$name")" -v n="$name" -v c="$note" 'BEGIN { printf "%10.1f MB  %-45s %s\n", s / 1e6, n, c }'
    done
}

list_history() {
  local names path name commit
  names=$(git log --full-history --no-renames --diff-filter=A --format= --name-only HEAD -- ":(top,literal)$DIR" \
    2>/dev/null | sort -u)
  [ -n "$names" ] || return 0
  while IFS= read -r path; do
    name=${path#"$DIR/"} commit=$(stored_in "$name")
    awk -v s="$(git cat-file -s "$commit:$path")" -v n="$name" \
      -v c="history, read only: $(git log -1 --format='%h %ci: %s' "$commit")" \
      'BEGIN { printf "%10.1f MB  %-45s %s\n", s / 1e6, n, c }'
  done <<< "$names"
}

case "${1:-}" in
  list)
    listing=$(list_store; list_history)
    [ -n "$listing" ] || die "no checkpoint in $STORE (nor in this branch's history)"
    echo "$listing"
    ;;
  restore)
    [ $# -eq 3 ] || die "usage: restore NAME FILE"
    check_name "$2"
    [ ! -e "$3" ] || die "$3 exists: not overwritten (move it away first)"
    mkdir -p "$(dirname "$3")"
    if [ -f "$STORE/$2" ]; then
      cp "$STORE/$2" "$3.part" || { rm -f "$3.part"; die "could not copy $STORE/$2"; }
      from=$STORE
    else
      commit=$(stored_in "$2")
      # (a folder of checkpoints matches the pathspec too: only a file is one)
      [ -n "$commit" ] && [ "$(git cat-file -t "$commit:$DIR/$2")" = blob ] \
        || die "$2 is neither in $STORE nor in this branch's history (bash benchmarks/checkpoints.sh list)"
      git cat-file blob "$commit:$DIR/$2" > "$3.part" \
        || { rm -f "$3.part"; die "could not read $2 from commit $commit"; }
      from="history (commit ${commit:0:10})"
    fi
    mv "$3.part" "$3"
    echo "restored $2 from $from -> $3 ($(du -h "$3" | cut -f1))"
    ;;
  save)
    [ $# -eq 4 ] || die "usage: save FILE NAME MESSAGE"
    [ -f "$2" ] || die "$2 is not a file"
    check_name "$3"
    check_store
    mkdir -p "$(dirname "$STORE/$3")"
    cp "$2" "$STORE/$3.part"
    mv "$STORE/$3.part" "$STORE/$3"
    printf '%s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S %z')" "$4" > "$STORE/$3.note"
    echo "saved $2 -> $STORE/$3 ($(du -h "$2" | cut -f1)); outside git, nothing committed"
    ;;
  *)
    die "usage: list | restore NAME FILE | save FILE NAME MESSAGE"
    ;;
esac
