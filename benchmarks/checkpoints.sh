#!/usr/bin/env bash
# Resumable training checkpoints, kept in the current branch's history (main's), never in its working tree:
# they are large (tens of MB each) and a device machine is sent main's working tree, which must stay under
# 64 MiB. `save` adds two commits on top of HEAD: one whose tree is HEAD's plus `.checkpoints/NAME`, then one
# that takes it out again, so the file lives in history only. A new checkout of main (a new session, a clone)
# brings it along; a separate branch did not survive into a new session's checkout (2026-12-02: lost).
# A later save of the same NAME replaces it for `restore`; history keeps every saved version (each adds its size
# to the repository for good: save one checkpoint per session, not one per hour).
#
#   bash benchmarks/checkpoints.sh list
#   bash benchmarks/checkpoints.sh restore NAME FILE        # refuses to overwrite FILE
#   bash benchmarks/checkpoints.sh save FILE NAME "message"
#
# `save` leaves the working tree and the index as they were (staged changes stay staged).
set -euo pipefail
DIR=.checkpoints
MAX_MB=95  # a host may refuse a push holding a file over 100 MB
die() { echo "checkpoints.sh: $*" >&2; exit 1; }
check_name() {
  [[ $1 =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ && /$1/ != */./* && /$1/ != */../* ]] \
    || die "bad checkpoint name '$1' (letters, digits, . _ - and /)"
}
# exact paths from the repository's top, whatever the current folder (no globs, no folder prefixes)
spec() { echo ":(top,literal)$DIR/$1"; }
# the commit that last stored NAME (it added the file; the commit after it removed it again); every parent of a
# merge is searched, not only the first
stored_in() { git log -1 --full-history --no-renames --format=%H --diff-filter=A HEAD -- "$(spec "$1")"; }

case "${1:-}" in
  list)
    names=$(git log --full-history --no-renames --diff-filter=A --format= --name-only HEAD -- \
      ":(top,literal)$DIR" | sort -u)
    [ -n "$names" ] || die "no checkpoint in this branch's history yet"
    while IFS= read -r path; do  # save admits no spaces or odd characters in names
      name=${path#"$DIR/"} commit=$(stored_in "$name")
      size=$(git cat-file -s "$commit:$path")
      awk -v s="$size" -v n="$name" -v c="$(git log -1 --format='%h %ci: %s' "$commit")" \
        'BEGIN { printf "%10.1f MB  %-45s %s\n", s / 1e6, n, c }'
    done <<< "$names"
    ;;
  restore)
    [ $# -eq 3 ] || die "usage: restore NAME FILE"
    check_name "$2"
    [ ! -e "$3" ] || die "$3 exists: not overwritten (move it away first)"
    commit=$(stored_in "$2")
    # (a folder of checkpoints matches the pathspec too: only a file is one)
    [ -n "$commit" ] && [ "$(git cat-file -t "$commit:$DIR/$2")" = blob ] \
      || die "$2 is not in this branch's history (bash benchmarks/checkpoints.sh list)"
    mkdir -p "$(dirname "$3")"
    git cat-file blob "$commit:$DIR/$2" > "$3.part" || { rm -f "$3.part"; die "could not read $2 from commit $commit"; }
    mv "$3.part" "$3"
    echo "restored $2 (commit ${commit:0:10}) -> $3 ($(du -h "$3" | cut -f1))"
    ;;
  save)
    [ $# -eq 4 ] || die "usage: save FILE NAME MESSAGE"
    [ -f "$2" ] || die "$2 is not a file"
    check_name "$3"
    [ "$(wc -c < "$2")" -le $((MAX_MB * 1000000)) ] || die "$2 is over $MAX_MB MB: slim it (EMA weights only?)"
    branch=$(git symbolic-ref -q HEAD) || die "HEAD is detached: save onto a branch"
    [ "$branch" = refs/heads/main ] || echo "checkpoints.sh: saving onto ${branch#refs/heads/}, not main:" \
      "it is kept only if this branch's commits land as they are (not squashed)" >&2
    head=$(git rev-parse HEAD)
    ! git cat-file -e "$head:$DIR/$3" 2>/dev/null || die "$DIR/$3 is in HEAD's tree: git rm it first"
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
