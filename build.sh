#!/usr/bin/env bash
# build.sh - build ./ipop (static, musl) and its pinned dependencies.
#
#   ./build.sh                 fetch + build deps if needed (musl and host), then ./ipop
#   ./build.sh deps            only fetch + build deps (musl and host), print flags
#   ./build.sh flags musl|host [cc|cflags|libs]
#                              print the compiler / flags / libraries for compiling a file
#                              that includes ipop.c against those deps (builds deps if stale;
#                              build logs go to stderr, flags to stdout)
#
# Environment:
#   IPOP_SOURCES_DIR   optional directory holding the pinned tarballs (checked first)
#   JOBS               parallel compile jobs (default: nproc)
#
# Pins live in vendor/pins.txt. Sources are looked up in $IPOP_SOURCES_DIR, then in
# .cache/sources/, and otherwise downloaded from the archive that this machine's own apt
# configuration points at. Every tarball is checked against its sha256 pin.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENDOR=$ROOT/vendor
CACHE=$ROOT/.cache
PINS=$VENDOR/pins.txt
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
APT_HELPER=${IPOP_APT_HELPER:-/usr/lib/apt/apt-helper}

log() { printf 'ipop: %s\n' "$*" >&2; }
die() { printf 'ipop: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
# command -> Debian package
need_tools() {
    local -a missing_pkgs=()
    local pair cmd pkg
    for pair in musl-gcc:musl-tools make:make tar:tar xz:xz-utils bzip2:bzip2 \
                gcc:gcc cc:gcc ar:binutils strip:binutils sha256sum:coreutils file:file \
                autoreconf:autoconf automake:automake libtoolize:libtool patch:patch; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || missing_pkgs+=("$pkg")
    done
    if ! command -v curl >/dev/null 2>&1 && [ ! -x "$APT_HELPER" ]; then
        missing_pkgs+=(curl)
    fi
    [ ${#missing_pkgs[@]} -eq 0 ] && return 0
    # de-duplicate
    mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
    if [ "$(id -u)" -eq 0 ]; then
        log "installing missing packages: ${missing_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y --no-install-recommends "${missing_pkgs[@]}" >&2; then
            apt-get update >&2
            apt-get install -y --no-install-recommends "${missing_pkgs[@]}" >&2
        fi
    else
        printf 'ipop: missing build tools; install them with:\n  sudo apt-get install %s\n' \
            "${missing_pkgs[*]}" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------- sources
# Base URI of the main Debian archive from this machine's apt configuration.
archive_uri() {
    command -v apt-get >/dev/null 2>&1 || return 1
    # shellcheck disable=SC2016  # $(...) are apt's format fields, not shell
    apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null \
        | awk '$2 !~ /-(security|updates|backports|proposed-updates)$/ && $1 !~ /security/ { print $1; exit }'
}

sha_of() { sha256sum "$1" | awk '{print $1}'; }

# verify FILE SHA: on mismatch delete it and stop.
verify_or_die() {
    local f=$1 want=$2 got
    got=$(sha_of "$f")
    if [ "$got" != "$want" ]; then
        rm -f "$f"
        die "sha256 mismatch for $f: expected $want, got $got (file deleted)"
    fi
}

# fetch_pin NAME FILE POOLPATH SHA -> ensures .cache/sources/FILE exists and matches
fetch_pin() {
    local name=$1 file=$2 pool=$3 sha=$4
    local dst=$CACHE/sources/$file
    mkdir -p "$CACHE/sources"
    if [ -n "${IPOP_SOURCES_DIR:-}" ] && [ -f "$IPOP_SOURCES_DIR/$file" ]; then
        local got
        got=$(sha_of "$IPOP_SOURCES_DIR/$file")
        [ "$got" = "$sha" ] || die "sha256 mismatch for $IPOP_SOURCES_DIR/$file: expected $sha, got $got"
        if [ ! -f "$dst" ] || [ "$(sha_of "$dst")" != "$sha" ]; then
            cp "$IPOP_SOURCES_DIR/$file" "$dst.tmp" && mv "$dst.tmp" "$dst"
        fi
        log "$name: using $IPOP_SOURCES_DIR/$file"
        return 0
    fi
    if [ -f "$dst" ]; then
        verify_or_die "$dst" "$sha"
        return 0
    fi
    local uri
    uri=$(archive_uri || true)
    [ -n "$uri" ] || die "$name: $file not in \$IPOP_SOURCES_DIR or $CACHE/sources and no apt archive URI found (apt-get indextargets)"
    uri=${uri%/}/$pool
    log "$name: downloading $uri"
    rm -f "$dst.part"
    local ok=0
    if [ -x "$APT_HELPER" ]; then
        local -a sandbox=()
        [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
        if "$APT_HELPER" "${sandbox[@]}" download-file "$uri" "$dst.part" "SHA256:$sha" >&2; then
            ok=1
        else
            log "$name: apt-helper download failed (rc=$?)"
            rm -f "$dst.part"
        fi
    fi
    if [ $ok -eq 0 ] && command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$dst.part" "$uri" >&2 || { rm -f "$dst.part"; die "$name: download of $uri failed"; }
        ok=1
    fi
    [ $ok -eq 1 ] || die "$name: could not download $uri"
    verify_or_die "$dst.part" "$sha"
    mv "$dst.part" "$dst"
}

# read pins: sets arrays PIN_NAME, PIN_VER, PIN_FILE, PIN_POOL, PIN_SHA
load_pins() {
    PIN_NAME=(); PIN_VER=(); PIN_FILE=(); PIN_POOL=(); PIN_SHA=()
    local name ver pool sha
    while read -r name ver _ pool sha _; do
        case "$name" in ''|'#'*) continue ;; esac
        PIN_NAME+=("$name"); PIN_VER+=("$ver"); PIN_POOL+=("$pool"); PIN_SHA+=("$sha")
        PIN_FILE+=("${pool##*/}")
    done < "$PINS"
}

pin_index() { local i; for i in "${!PIN_NAME[@]}"; do [ "${PIN_NAME[$i]}" = "$1" ] && { echo "$i"; return; }; done; die "no pin named $1"; }

src_dir() { local i; i=$(pin_index "$1"); echo "$CACHE/src/$1-${PIN_VER[$i]}"; }

# Our changes to a pinned source: vendor/patches/NAME-*.patch, applied in name
# order (patch -p1) right after unpacking; each says what it changes and why.
pin_patches() { ls "$VENDOR/patches/$1"-*.patch 2>/dev/null || true; }
patches_sha() { pin_patches "$1" | xargs -r cat | sha256sum | awk '{print $1}'; }

# unpack NAME once and apply its patches (the stamp holds the tarball's and
# the patches' sha, so a changed patch unpacks afresh)
unpack_pin() {
    local name=$1 i dir file sha stamp p
    i=$(pin_index "$name"); dir=$(src_dir "$name"); file=${PIN_FILE[$i]}; sha=${PIN_SHA[$i]}
    stamp="$sha $(patches_sha "$name")"
    if [ -f "$dir/.ipop-unpacked" ] && [ "$(cat "$dir/.ipop-unpacked")" = "$stamp" ]; then
        return 0
    fi
    fetch_pin "$name" "$file" "${PIN_POOL[$i]}" "$sha"
    log "$name: unpacking $file"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    tar -xf "$CACHE/sources/$file" -C "$dir.tmp" --strip-components=1
    for p in $(pin_patches "$name"); do
        log "$name: applying $(basename "$p")"
        patch -p1 --forward --quiet -d "$dir.tmp" < "$p" || die "$name: $(basename "$p") does not apply"
    done
    echo "$stamp" > "$dir.tmp/.ipop-unpacked"
    mv "$dir.tmp" "$dir"
}

# ---------------------------------------------------------------- flags
# NB: the config header must NOT be called "mbedtls_config.h": mbedTLS's build_info.h does
# `#include MBEDTLS_CONFIG_FILE`, and a quoted include looks in the including file's own
# directory first, where mbedTLS's full default include/mbedtls/mbedtls_config.h lives.
MBEDTLS_CFG_DEF="-DMBEDTLS_CONFIG_FILE='\"ipop_mbedtls_config.h\"'"

variant_cc() {
    case "$1" in
        musl) echo musl-gcc ;;
        host) echo "${HOST_CC:-gcc}" ;;
        *) die "unknown variant '$1' (use musl or host)" ;;
    esac
}
variant_dep_cflags() {
    case "$1" in
        musl) echo "-O2" ;;
        host) echo "-O1 -g" ;;
    esac
}
include_flags() {
    local mb lw
    mb=$(src_dir mbedtls); lw=$(src_dir lwip)
    # libsodium's headers are the same for every variant: take the musl install's.
    echo "-I$VENDOR -I$VENDOR/lwip-port -I$lw/src/include -I$mb/include -I$CACHE/sodium-musl/include $MBEDTLS_CFG_DEF"
}
libs_for() {
    local d=$CACHE/$1/lib
    local extra="-lm"
    echo "$d/libmbedtls.a $d/libmbedx509.a $d/libmbedcrypto.a $d/liblwip.a $CACHE/sodium-$1/lib/libsodium.a $extra"
}

# ---------------------------------------------------------------- deps
config_hash() {
    # anything that should trigger a dependency rebuild (libsodium has its own stamp)
    {
        grep -v '^libsodium ' "$PINS"
        (cd "$VENDOR" && find . -type f \( -name '*.h' -o -name '*.patch' \) -print0 | sort -z | xargs -0 sha256sum)
        echo "$1 $(variant_cc "$1") $(variant_dep_cflags "$1")"
        "$(variant_cc "$1")" --version 2>/dev/null | head -1
        echo "recipe-v1"
    } | sha256sum | awk '{print $1}'
}

build_variant() {
    local v=$1 cc cflags out stamp want t0
    cc=$(variant_cc "$v"); cflags=$(variant_dep_cflags "$v")
    out=$CACHE/$v; stamp=$out/.ipop-stamp
    want=$(config_hash "$v")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
       && [ -f "$out/lib/libmbedcrypto.a" ] && [ -f "$out/lib/liblwip.a" ]; then
        return 0
    fi
    t0=$SECONDS
    log "building deps ($v, $cc $cflags) ..."
    rm -rf "$out"
    mkdir -p "$out/lib" "$out/obj"

    # mbedTLS: copy the pristine tree (include/library/3rdparty) so the source cache stays
    # clean and a changed config header always means a full rebuild.
    local mb bt
    mb=$(src_dir mbedtls); bt=$out/mbedtls
    mkdir -p "$bt"
    local d
    for d in include library 3rdparty; do
        cp -a "$mb/$d" "$bt/"
    done
    # referenced only as (already satisfied) prerequisites of generated files
    for d in scripts framework; do
        [ -e "$mb/$d" ] && ln -s "$mb/$d" "$bt/$d"
    done
    if ! make -C "$bt/library" -j"$JOBS" CC="$cc" AR=ar \
            CFLAGS="$cflags -I$VENDOR $MBEDTLS_CFG_DEF" libmbedcrypto.a libmbedx509.a libmbedtls.a > "$out/mbedtls-build.log" 2>&1; then
        tail -40 "$out/mbedtls-build.log" >&2
        die "mbedTLS build ($v) failed; full log: $out/mbedtls-build.log"
    fi
    if grep -q 'warning:' "$out/mbedtls-build.log"; then
        log "mbedTLS ($v) produced warnings:"
        grep -A3 'warning:' "$out/mbedtls-build.log" | head -40 >&2
    fi
    cp "$bt/library/libmbedcrypto.a" "$bt/library/libmbedx509.a" "$bt/library/libmbedtls.a" "$out/lib/"
    rm -rf "$bt"

    # lwIP: compile the core + IPv4 + ethernet directly, out of tree.
    local lw
    lw=$(src_dir lwip)
    local -a srcs=()
    mapfile -t srcs < <(ls "$lw"/src/core/*.c "$lw"/src/core/ipv4/*.c "$lw"/src/netif/ethernet.c)
    export IPOP_CC="$cc" IPOP_CFLAGS="$cflags -std=gnu11 -Wall -I$VENDOR -I$VENDOR/lwip-port -I$lw/src/include" IPOP_OBJ="$out/obj"
    # shellcheck disable=SC2016  # expanded by the inner sh
    if ! printf '%s\n' "${srcs[@]}" | xargs -P "$JOBS" -I{} sh -c \
            'f="$1"; o="$IPOP_OBJ/lwip_$(echo "$f" | sed "s|.*/src/||; s|/|_|g; s|\.c$|.o|")"; $IPOP_CC $IPOP_CFLAGS -c "$f" -o "$o"' _ {} \
            > "$out/lwip-build.log" 2>&1; then
        tail -40 "$out/lwip-build.log" >&2
        die "lwIP build ($v) failed; full log: $out/lwip-build.log"
    fi
    rm -f "$out/lib/liblwip.a"
    ar rcs "$out/lib/liblwip.a" "$out"/obj/lwip_*.o
    rm -rf "$out/obj"

    echo "$want" > "$stamp"
    log "deps ($v) built in $((SECONDS - t0)) s -> $out/lib"
}

# libsodium (its ChaCha20-Poly1305 for the records: docs/PERFORMANCE.md says
# why): the release tarball's own configure, out of tree, static only, into
# .cache/sodium-VARIANT with its own stamp.
build_sodium() {
    local v=$1 cc cflags out stamp want src t0
    cc=$(variant_cc "$v"); cflags=$(variant_dep_cflags "$v")
    out=$CACHE/sodium-$v; stamp=$out/.ipop-stamp
    src=$(src_dir libsodium)
    want=$(printf '%s\n' "$(grep '^libsodium ' "$PINS")" "$cc $cflags" "sodium-recipe-v1" | sha256sum | awk '{print $1}')
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$out/lib/libsodium.a" ]; then
        return 0
    fi
    t0=$SECONDS
    log "building libsodium ($v, $cc $cflags) ..."
    rm -rf "$out" "$out.build"
    mkdir -p "$out.build"
    # The Debian orig tarball is the git tree: generate configure once.
    if [ ! -x "$src/configure" ] && ! (cd "$src" && ./autogen.sh -s) > "$CACHE/sodium-autogen.log" 2>&1; then
        tail -20 "$CACHE/sodium-autogen.log" >&2
        die "libsodium: autogen.sh failed (needs autoconf, automake, libtool); log: $CACHE/sodium-autogen.log"
    fi
    if ! (cd "$out.build" && "$src/configure" --prefix="$out" --disable-shared --enable-static \
            --disable-debug --without-pthreads CC="$cc" CFLAGS="$cflags" \
            && make -j"$JOBS" && make install) > "$CACHE/sodium-$v-build.log" 2>&1; then
        tail -40 "$CACHE/sodium-$v-build.log" >&2
        die "libsodium build ($v) failed; full log: $CACHE/sodium-$v-build.log"
    fi
    rm -rf "$out.build"
    echo "$want" > "$stamp"
    log "libsodium ($v) built in $((SECONDS - t0)) s -> $out/lib"
}

# Serialise concurrent build.sh runs that share .cache (e.g. two shells, make -j).
lock_cache() {
    [ -n "${IPOP_CACHE_LOCKED:-}" ] && return 0
    mkdir -p "$CACHE"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$CACHE/.lock"
        flock 9
    fi
    IPOP_CACHE_LOCKED=1
}

ensure_deps() {
    lock_cache
    load_pins
    unpack_pin lwip
    unpack_pin mbedtls
    unpack_pin libsodium
    local v
    for v in "$@"; do build_variant "$v"; build_sodium "$v"; done
    [ -f "$CACHE/sodium-musl/include/sodium.h" ] || build_sodium musl    # the headers
}

print_flags() {
    local v=$1 what=${2:-all}
    case "$what" in
        cc) variant_cc "$v" ;;
        cflags) include_flags ;;
        libs) libs_for "$v" ;;
        all)
            echo "CC=$(variant_cc "$v")"
            echo "CFLAGS=$(include_flags)"
            if [ "$v" = musl ]; then echo "LDFLAGS=-static"; else echo "LDFLAGS="; fi
            echo "LIBS=$(libs_for "$v")"
            ;;
        *) die "flags: unknown item '$what' (cc|cflags|libs)" ;;
    esac
}

# ---------------------------------------------------------------- ipop
build_ipop() {
    [ -f "$ROOT/ipop.c" ] || die "ipop.c not found in $ROOT"
    local t0=$SECONDS out=${IPOP_OUT:-$ROOT/ipop}   # IPOP_OUT: build elsewhere (e.g. during a test run)
    local -a cc_cmd libs
    read -r -a libs <<< "$(libs_for musl)"
    cc_cmd=(musl-gcc -static -O2 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror
         -I"$VENDOR" -I"$VENDOR/lwip-port" -I"$(src_dir lwip)/src/include" -I"$(src_dir mbedtls)/include"
         -I"$CACHE/sodium-musl/include" '-DMBEDTLS_CONFIG_FILE="ipop_mbedtls_config.h"'
         "$ROOT/ipop.c" -o "$out.tmp"
         "${libs[@]}")
    log "compiling ipop.c"
    "${cc_cmd[@]}" || { rm -f "$out.tmp"; die "compiling ipop.c failed"; }
    [ -n "${IPOP_NOSTRIP:-}" ] || strip "$out.tmp"     # IPOP_NOSTRIP=1: keep symbols for perf
    local desc
    desc=$(file -b "$out.tmp")
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) rm -f "$out.tmp"; die "ipop is not statically linked: $desc" ;;
    esac
    mv "$out.tmp" "$out"
    local kb=$(( ($(stat -c %s "$out") + 1023) / 1024 ))
    echo "ipop: built ${out#$ROOT/} ($kb KB, static) in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- main
action=${1:-all}
case "$action" in
    all|"")
        need_tools
        ensure_deps musl host
        build_ipop
        ;;
    deps)
        need_tools
        ensure_deps musl host
        for v in musl host; do
            echo "# $v"
            print_flags "$v"
        done
        ;;
    flags)
        v=${2:-}
        case "$v" in musl|host) ;; *) die "usage: $0 flags musl|host [cc|cflags|libs]" ;; esac
        need_tools
        ensure_deps "$v" >&2
        print_flags "$v" "${3:-all}"
        ;;
    -h|--help|help)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *)
        die "unknown command '$action' (use: all, deps, flags musl|host)"
        ;;
esac
