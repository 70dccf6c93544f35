#!/bin/sh
# Install or remove xskbroker's systemd units, sysusers.d and tmpfiles.d entries, the example policy,
# the libvirt hook (only where libvirt is installed: /etc/libvirt exists) and the notes. Idempotent:
# running it again changes nothing; an edited policy, policy.d drop-ins and an edited libvirt.conf are
# never replaced or removed, and uninstall says which it kept.
#
#   deploy/install.sh [install|uninstall] [--prefix DIR] [--bindir DIR] [--root DESTDIR] [--quiet]
#
#   --prefix DIR   where systemd looks for vendor files: DIR/lib/systemd/system, DIR/lib/sysusers.d,
#                  DIR/lib/tmpfiles.d (default /usr/local; systemd searches /usr/local and /usr)
#   --bindir DIR   where the `xskbroker` command is (default PREFIX/bin): ExecStart= points there
#   --root DIR     install below DIR instead of / (packaging, tests); nothing is started then
#
# The Python package itself is installed by pip (docs/systemd.md). Installing into / on a host that
# runs systemd also creates the group, the directories and reloads systemd; enabling is left to you:
#   systemctl enable --now xskbroker.socket
set -eu
# Nothing installed may be writable by others: the broker refuses a policy that is (StrictModes).
umask 022

action=install
prefix=/usr/local
bindir=
root=
quiet=

# the comment block at the top of this file
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        install|uninstall) action=$1 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) prefix=${1#*=} ;;
        --bindir) bindir=${2:?--bindir needs a directory}; shift ;;
        --bindir=*) bindir=${1#*=} ;;
        --root|--destdir) root=${2:?--root needs a directory}; shift ;;
        --root=*|--destdir=*) root=${1#*=} ;;
        --quiet|-q) quiet=1 ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done

nl='
'
# Both paths are written into unit files (below): absolute, and one line each (no newline or other control
# character). The command's path also becomes an executable systemd accepts: none of ' " \ (string_is_safe()
# in systemd's config_parse_exec: "Executable name contains special characters", a fatal unit error), and
# UTF-8 (systemd ignores a line that is not).
refuse() { printf "install.sh: %s\n" "$1" >&2; exit 2; }
unit_path() {
    case "$2" in /*) ;; *) refuse "--$1 must be absolute: $2" ;; esac
    case "$2" in *"$nl"*) refuse "--$1 must not contain a newline" ;; esac
    if printf '%s' "$2" | LC_ALL=C grep -q '[[:cntrl:]]'; then
        refuse "--$1 must not contain a control character: $2"
    fi
}
unit_path prefix "$prefix"
prefix=${prefix%/}
bindir=${bindir:-$prefix/bin}
bindir=${bindir%/}
unit_path bindir "$bindir"
case "$bindir" in
    *[\'\\\"]*) refuse "--bindir (PREFIX/bin unless given) must not contain ' \" or \\: systemd refuses them in ExecStart=: $bindir" ;;
esac
if command -v iconv >/dev/null && ! printf '%s' "$bindir" | iconv -f UTF-8 -t UTF-8 >/dev/null 2>&1; then
    refuse "--bindir (PREFIX/bin unless given) must be UTF-8: systemd ignores an ExecStart= that is not: $bindir"
fi
root=${root%/}

here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")
unitdir=$prefix/lib/systemd/system
sysusersdir=$prefix/lib/sysusers.d
tmpfilesdir=$prefix/lib/tmpfiles.d
docdir=$prefix/share/doc/xskbroker
confdir=/etc/xskbroker
libvirtdir=/etc/libvirt
hookdir=$libvirtdir/hooks/qemu.d

say() { [ -n "$quiet" ] || printf "%s\n" "$*"; }

# systemd is managing this host (sd_booted(3)), and we are installing into it
live() { [ -z "$root" ] && [ -d /run/systemd/system ]; }

# $1 as the executable of a unit's command line (systemd.service "Command lines"). systemd splits the line on
# whitespace and unquotes each word, then expands % specifiers in it: double quotes keep it one word, %% is one
# %. Environment substitution ($$, ${X}) applies to argv but never to the executable's path, so a $ is written
# as is and the ":" prefix turns the substitution off, keeping argv[0] the path too.
unit_exec() {
    word=$(printf '%s\n' "$1" | sed -e 's/%/%%/g')
    case "$1" in
        *[!A-Za-z0-9/._+,@=:~-]*) word="\"$word\"" ;;
    esac
    case "$1" in
        *'$'*) word=":$word" ;;
    esac
    printf '%s\n' "$word"
}

# $1 as the path of a file: URL in a unit's Documentation=: percent-encoded (it is a URL, and systemd splits the
# list on whitespace), each % then doubled for the specifier expansion
unit_file_url() {
    printf '%s' "$1" | LC_ALL=C od -An -v -tx1 | LC_ALL=C awk '
        BEGIN { for (i = 33; i < 127; i++) { c = sprintf("%c", i); if (c ~ /[A-Za-z0-9\/._~-]/) keep[sprintf("%02x", i)] = c } }
        { for (f = 1; f <= NF; f++) printf "%s", (($f in keep) ? keep[$f] : "%" toupper($f)) }
        END { print "" }' | sed -e 's/%/%%/g'
}

# $1 as the replacement of sed's s|||: \, & and the delimiter taken literally
sed_literal() { printf '%s\n' "$1" | sed -e 's/[\\&|]/\\&/g'; }

exec_in_units=$(sed_literal "$(unit_exec "$bindir/xskbroker")")
docs_in_units=$(sed_literal "$(unit_file_url "$docdir")")

# install SRC to DEST with MODE, rewriting the paths that depend on where things are installed (they occur
# only in unit syntax: the units, and the unit snippet in docs/systemd.md); an unchanged file is left alone
put() {
    mode=$1 from=$2 to=$root$3
    tmp=$(mktemp)
    sed -e "s|/usr/local/bin/xskbroker|$exec_in_units|g" \
        -e "s|file:/usr/local/share/doc/xskbroker|file:$docs_in_units|g" "$from" > "$tmp"
    if [ -f "$to" ] && cmp -s "$tmp" "$to"; then
        rm -f "$tmp"
        return 0
    fi
    mkdir -p "$(dirname "$to")"
    install -m "$mode" "$tmp" "$to"
    rm -f "$tmp"
    say "installed $to"
}

drop() {
    if [ -e "$root$1" ] || [ -L "$root$1" ]; then
        rm -f "$root$1"
        say "removed $root$1"
    fi
}

do_install() {
    put 0644 "$here/systemd/xskbroker.socket" "$unitdir/xskbroker.socket"
    put 0644 "$here/systemd/xskbroker.service" "$unitdir/xskbroker.service"
    put 0644 "$here/sysusers.d/xskbroker.conf" "$sysusersdir/xskbroker.conf"
    put 0644 "$here/tmpfiles.d/xskbroker.conf" "$tmpfilesdir/xskbroker.conf"
    put 0644 "$src/docs/systemd.md" "$docdir/systemd.md"
    put 0644 "$src/docs/libvirt.md" "$docdir/libvirt.md"
    if [ -d "$root$libvirtdir" ]; then
        install_hook
    else
        say "skipped the libvirt hook: $root$libvirtdir does not exist (libvirt is not installed; run this again after installing it)"
    fi
    mkdir -p "$root$confdir/policy.d"
    if [ -e "$root$confdir/policy.toml" ]; then
        say "kept $root$confdir/policy.toml"
    else
        # world-readable: the broker runs as a dynamic user; the policy holds no secret
        install -m 0644 "$here/policy.example.toml" "$root$confdir/policy.toml"
        say "installed $root$confdir/policy.toml (the example: edit it, then systemctl reload xskbroker)"
    fi
    # a policy others could rewrite would make them admin: the broker refuses it, so close it now
    for f in "$root$confdir" "$root$confdir/policy.d" "$root$confdir/policy.toml" "$root$confdir/policy.d"/*.toml; do
        if [ -e "$f" ] && [ -n "$(find "$f" -maxdepth 0 -perm /022 ! -type l)" ]; then
            chmod go-w "$f"
            say "$f: group/world write removed (the broker refuses a policy others could rewrite)"
        fi
    done
    if [ ! -x "$root$bindir/xskbroker" ]; then
        say "note: $root$bindir/xskbroker does not exist yet: install the package there (docs/systemd.md)"
    elif [ -z "$root" ]; then
        compile_package
    fi
    if live; then
        systemd-sysusers "$sysusersdir/xskbroker.conf"
        systemd-tmpfiles --create "$tmpfilesdir/xskbroker.conf"
        systemctl daemon-reload
        say "next: systemctl enable --now xskbroker.socket"
    fi
}

# Byte-code for the package the command runs. pip writes it, but not with --no-compile or for a copied tree,
# and the unit's ProtectSystem=strict then keeps the interpreter from caching it: every socket-activated start
# would compile every module again (~150 ms before the first grant). Compiling what is current is a no-op.
compile_package() {
    interp=$(sed -n '1s/^#! *//p' "$bindir/xskbroker")
    pkg=$("${interp:-/usr/bin/python3}" -c 'import os, xskbroker; print(os.path.dirname(xskbroker.__file__))' \
          2>/dev/null) || return 0  # a command that sets up its own path: nothing here to find it by
    if ! "${interp:-/usr/bin/python3}" -m compileall -q "$pkg" >/dev/null 2>&1; then
        say "note: could not byte-compile $pkg: each start of the broker compiles it again (slower)"
    fi
}

# The libvirt hook runs as its own script: its first line must name the interpreter that has the
# xskbroker package, which is the one the installed `xskbroker` command starts with. pip starts the command
# with a /bin/sh launcher instead (#!/bin/sh, '''exec' "PYTHON" "$0" "$@", ' ''') when PYTHON's path has a
# space or is too long for #!: the hook then starts with the same three lines, never /bin/sh on Python code.
install_hook() {
    interp= header=
    if [ -r "$root$bindir/xskbroker" ]; then
        interp=$(sed -n '1s/^#! *//p' "$root$bindir/xskbroker")
        if [ "$interp" = /bin/sh ] && sed -n 2p "$root$bindir/xskbroker" | grep -q "^'''exec' "; then
            header=$(sed -n 1,3p "$root$bindir/xskbroker")
        fi
    fi
    header=${header:-#!${interp:-/usr/bin/python3}}
    tmp=$(mktemp)
    { printf '%s\n' "$header"; sed 1d "$here/libvirt/xskbroker"; } > "$tmp"
    if ! { [ -f "$root$hookdir/xskbroker" ] && cmp -s "$tmp" "$root$hookdir/xskbroker"; }; then
        mkdir -p "$root$hookdir"
        install -m 0755 "$tmp" "$root$hookdir/xskbroker"
        say "installed $root$hookdir/xskbroker (libvirt reads hooks when it starts: restart libvirtd)"
    fi
    rm -f "$tmp"
    if [ ! -e "$root$confdir/libvirt.conf" ]; then
        mkdir -p "$root$confdir"
        install -m 0644 "$here/libvirt/libvirt.conf" "$root$confdir/libvirt.conf"
        say "installed $root$confdir/libvirt.conf"
    fi
}

do_uninstall() {
    if live; then
        systemctl disable --now xskbroker.socket xskbroker.service 2>/dev/null || true
    fi
    drop "$unitdir/xskbroker.socket"
    drop "$unitdir/xskbroker.service"
    drop "$sysusersdir/xskbroker.conf"
    drop "$tmpfilesdir/xskbroker.conf"
    drop "$docdir/systemd.md"
    drop "$docdir/libvirt.md"
    drop "$hookdir/xskbroker"
    # qemu.d is ours when empty; /etc/libvirt/hooks belongs to libvirt's package and stays
    rmdir "$root$hookdir" 2>/dev/null || true
    if [ -f "$root$confdir/libvirt.conf" ] && cmp -s "$here/libvirt/libvirt.conf" "$root$confdir/libvirt.conf"; then
        drop "$confdir/libvirt.conf"
    elif [ -e "$root$confdir/libvirt.conf" ]; then
        say "kept $root$confdir/libvirt.conf (edited; remove it yourself if it is no longer wanted)"
    fi
    # the folders install made, when empty (none of them is a standard one a system has anyway: /usr/local/lib,
    # /usr/share/doc and /etc stay); on a Debian host systemd's own /usr/lib/... are never empty
    for d in "$docdir" "$unitdir" "$(dirname "$unitdir")" "$sysusersdir" "$tmpfilesdir"; do
        rmdir "$root$d" 2>/dev/null || true
    done
    if [ -f "$root$confdir/policy.toml" ] && cmp -s "$here/policy.example.toml" "$root$confdir/policy.toml"; then
        drop "$confdir/policy.toml"
    elif [ -e "$root$confdir/policy.toml" ]; then
        say "kept $root$confdir/policy.toml (edited; remove it yourself if it is no longer wanted)"
    fi
    # install only makes the folder: whatever is in it, an admin put there
    for f in "$root$confdir/policy.d"/* "$root$confdir/policy.d"/.[!.]*; do
        if [ -e "$f" ] || [ -L "$f" ]; then
            say "kept $f (a policy.d drop-in: remove it yourself if it is no longer wanted)"
        fi
    done
    rmdir "$root$confdir/policy.d" "$root$confdir" 2>/dev/null || true
    if live; then
        systemctl daemon-reload
        # groups are never removed automatically (files may still carry the gid)
        say "the group xskbroker is kept; groupdel xskbroker if nothing uses it"
    fi
}

"do_$action"
