#!/usr/bin/env bash
# Fetches ONNX Runtime's C/C++ API headers (no libraries) into PREFIX/include, usable as ONNXRUNTIME_ROOT,
# for building the CoupledScan custom-op library. No ORT wheel ships them; Debian trixie's
# libonnxruntime-dev does. One pinned .deb (checked by sha256) is unpacked with dpkg-deb (or ar + tar);
# nothing on this system is installed or changed. The headers are architecture-independent, so the
# amd64 package serves every machine. Build against headers no newer than the ONNX Runtime you load the
# library into (1.21 -> ORT >= 1.21).
#
#   scripts/fetch_ort_headers.sh [PREFIX] [DEB]      # default PREFIX: build/ort
#   cmake -S . -B build -DONNXRUNTIME_ROOT=$PWD/build/ort
#
# Where the .deb comes from: DEB (or $CM_ORT_HEADERS_DEB), a local path or a URL, when given; else apt
# downloads it, with a private sources list and cache, from the Debian mirror(s) this machine's own apt
# configuration names (`apt-get indextargets`), suite trixie. No package host is named here.
set -euo pipefail

prefix=${1:-build/ort}
source_deb=${2:-${CM_ORT_HEADERS_DEB:-}}
ver=${CM_ORT_HEADERS_VERSION:-1.21.0+dfsg-1}
sha=${CM_ORT_HEADERS_SHA256:-14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08}
deb=libonnxruntime-dev_${ver}_amd64.deb
if [[ -f "$prefix/include/onnxruntime_cxx_api.h" ]]; then
  echo "ONNX Runtime headers already in $prefix/include"
  exit 0
fi
mkdir -p "$prefix"
work=$(mktemp -d "${prefix%/}/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetched=""
if [[ -n "$source_deb" ]]; then
  case $source_deb in
    *://*) "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
             "$source_deb" "$work/$deb" && fetched=$work/$deb ;;
    *) [[ -f "$source_deb" ]] || { echo "fetch_ort_headers: $source_deb: no such file" >&2; exit 1; }
       fetched=$source_deb ;;
  esac
elif command -v apt-get >/dev/null 2>&1; then
  # the machine's configured repositories (security archives last: they carry no trixie main)
  mapfile -t mirrors < <(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | awk '!seen[$0]++' \
                         | awk '/security/ {late = late $0 "\n"; next} {print} END {printf "%s", late}')
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  apt=(apt-get -q -o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o APT::Architecture=amd64
       -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1)
  for uri in "${mirrors[@]}"; do
    echo "deb [arch=amd64] $uri trixie main" > "$work/sources.list"
    if "${apt[@]}" update >/dev/null 2>&1 && (cd "$work" && "${apt[@]}" download "libonnxruntime-dev:amd64=$ver" >/dev/null 2>&1) \
        && [[ -f "$work/$deb" ]]; then
      fetched=$work/$deb
      break
    fi
  done
fi
if [[ -z "$fetched" ]]; then
  echo "fetch_ort_headers: cannot get $deb: no Debian mirror in this machine's apt configuration serves" \
       "trixie's libonnxruntime-dev $ver; pass the .deb (a path or URL) as the second argument or in" \
       "CM_ORT_HEADERS_DEB, or set ONNXRUNTIME_ROOT to headers you have" >&2
  exit 1
fi
echo "$sha  $fetched" | sha256sum -c --quiet - || { echo "fetch_ort_headers: $deb does not match its pinned sha256" >&2; exit 1; }

if command -v dpkg-deb >/dev/null 2>&1; then
  dpkg-deb -x "$fetched" "$work/x"
else
  mkdir -p "$work/x" && (cd "$work" && ar x "$fetched" data.tar.xz && tar -C x -xJf data.tar.xz)
fi
mkdir -p "$prefix/include"
cp -r "$work/x/usr/include/onnxruntime/." "$prefix/include/"
[[ -f "$prefix/include/onnxruntime_cxx_api.h" ]] || { echo "fetch_ort_headers: no onnxruntime_cxx_api.h in $deb" >&2; exit 1; }
echo "fetched ONNX Runtime $ver headers into $prefix/include ($(grep -m1 '#define ORT_API_VERSION' "$prefix/include/onnxruntime_c_api.h"))"
