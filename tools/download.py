"""Download a file with resume and a progress bar: python tools/download.py URL DEST

An interrupted download leaves DEST.part; running the same command again continues from where it stopped.
"""
import argparse
import os
import sys
import urllib.error
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20


def download(url, dest, timeout=60):
    if os.path.exists(dest):
        print(f"{dest} already exists")
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:   # the part file is already complete
            os.replace(part, dest)
            return dest
        raise
    with response:
        if have and response.status != 206:   # the server ignored the range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    if total is not None and os.path.getsize(part) != total:
        raise OSError(f"download of {url} stopped at {os.path.getsize(part)} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="http(s) URL of the file")
    parser.add_argument("dest", help="where to write it, e.g. data/minipile.bin")
    args = parser.parse_args(argv)
    try:
        download(args.url, args.dest)
    except OSError as e:   # urllib's errors are OSErrors too; a URLError's text wraps its reason in <urlopen error>
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        sys.exit(f"error: could not download {args.url} into {args.dest}: {reason}; check the URL and that "
                 f"{args.dest}'s folder can be written, or fetch the file by hand into {args.dest} (a partial "
                 f"{args.dest}.part is resumed on the next run)")


if __name__ == "__main__":
    main()
