#!/usr/bin/env bash
# Resumable training checkpoints, kept in the current branch's history (main's), never in its working tree:
# they are large (tens of MB each) and a device machine is sent main's working tree, which must stay under
# 64 MiB. `save` adds two commits on top of HEAD: one whose tree is HEAD's plus `.checkpoints/NAME`, then one
# that takes it out again, so the file lives in history only. A new checkout of main (a new session, a clone)
# brings it along; a separate branch did not survive into a new session's checkout (2026-12-02: lost).
# A later save of the same NAME replaces it for `restore` (history keeps every saved version).
#
#   bash benchmarks/checkpoints.sh list
#   bash benchmarks/checkpoints.sh restore NAME FILE        # refuses to overwrite FILE
#   bash benchmarks/checkpoints.sh save FILE NAME "message"
#
# `save` leaves the working tree and the index as they were (staged changes stay staged).
set -euo pipefail
DIR=.checkpoints
die() { echo "checkpoints.sh: $*" >&2; exit 1; }
# the commit that last stored NAME (it added the file; the commit after it removed it again)
stored_in() { git log -1 --format=%H --diff-filter=A HEAD -- "$DIR/$1"; }

case "${1:-}" in
  list)
    names=$(git log --diff-filter=A --format= --name-only HEAD -- "$DIR/" | sort -u)
    [ -n "$names" ] || die "no checkpoint in this branch's history yet"
    for path in $names; do
      name=${path#"$DIR/"} commit=$(stored_in "$name")
      size=$(git cat-file -s "$commit:$path")
      awk -v s="$size" -v n="$name" -v c="$(git log -1 --format='%h %ci: %s' "$commit")" \
        'BEGIN { printf "%10.1f MB  %-45s %s\n", s / 1e6, n, c }'
    done
    ;;
  restore)
    [ $# -eq 3 ] || die "usage: restore NAME FILE"
    [ ! -e "$3" ] || die "$3 exists: not overwritten (move it away first)"
    commit=$(stored_in "$2")
    [ -n "$commit" ] || die "$2 is not in this branch's history (bash benchmarks/checkpoints.sh list)"
    mkdir -p "$(dirname "$3")"
    git cat-file blob "$commit:$DIR/$2" > "$3.part" && mv "$3.part" "$3"
    echo "restored $2 (commit ${commit:0:10}) -> $3 ($(du -h "$3" | cut -f1))"
    ;;
  save)
    [ $# -eq 4 ] || die "usage: save FILE NAME MESSAGE"
    [ -f "$2" ] || die "$2 is not a file"
    branch=$(git symbolic-ref -q HEAD) || die "HEAD is detached: save onto a branch"
    head=$(git rev-parse HEAD)
    blob=$(git hash-object -w "$2")
    index=$(mktemp)
    trap 'rm -f "$index"' EXIT
    GIT_INDEX_FILE=$index git read-tree "$head"
    GIT_INDEX_FILE=$index git update-index --add --cacheinfo "100644,$blob,$DIR/$3"
    with=$(git commit-tree "$(GIT_INDEX_FILE=$index git write-tree)" -p "$head" -m "checkpoint $3: $4")
    without=$(git commit-tree "$head^{tree}" -p "$with" \
      -m "checkpoint $3 kept in history only (bash benchmarks/checkpoints.sh restore $3 FILE)")
    git update-ref -m "checkpoints.sh save $3" "$branch" "$without" "$head"  # fails if HEAD moved meanwhile
    echo "saved $2 -> $DIR/$3 in commit ${with:0:10} ($(du -h "$2" | cut -f1)); HEAD's tree unchanged"
    ;;
  *)
    die "usage: list | restore NAME FILE | save FILE NAME MESSAGE"
    ;;
esac
