#!/usr/bin/env python3
"""Renders a kustomization under configs/kubernetes into one multi-document YAML stream.

It implements exactly the kustomize features these manifests use, so CI can validate the
rendered objects without kubectl or kustomize on the machine:
  - `resources`: YAML files and folders holding a kustomization.yaml (rendered recursively)
  - `patches`: JSON 6902 operations (add, replace, remove, test) given inline or by `path`,
    applied to the objects matching `target` (kind and/or name)
  - `images`: `name` -> `newName`/`newTag` for containers and init containers
Any other kustomization field is an error that names it, so a manifest never relies on a
feature this renderer ignores. `kubectl kustomize DIR` gives the same objects.

Usage: render-kustomization.py DIR [--out FILE]   (needs PyYAML)
"""

import argparse
import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}


class RenderError(Exception):
    pass


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise RenderError(f"{path}: not valid YAML: {e}") from e
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{path}: every document must be an object with apiVersion and kind")
    return docs


def pointer(path):
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer '{path}' must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def walk(doc, parts, what):
    node = doc
    for p in parts:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise RenderError(f"{what}: no list index '{p}'")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                raise RenderError(f"{what}: no key '{p}'")
            node = node[p]
        else:
            raise RenderError(f"{what}: '{p}' goes into a scalar")
    return node


def apply_op(doc, op, where):
    kind, path = op.get("op"), op.get("path")
    if kind not in ("add", "replace", "remove", "test") or not isinstance(path, str):
        raise RenderError(f"{where}: unsupported patch operation {op!r}")
    parts = pointer(path)
    what = f"{where}: {kind} {path}"
    parent = walk(doc, parts[:-1], what)
    last = parts[-1]
    if kind == "test":
        if walk(doc, parts, what) != op.get("value"):
            raise RenderError(f"{what}: is {walk(doc, parts, what)!r}, expected {op.get('value')!r}")
        return
    if isinstance(parent, list):
        if last == "-" and kind == "add":
            parent.append(copy.deepcopy(op["value"]))
            return
        if not last.isdigit() or int(last) > len(parent) - (0 if kind == "add" else 1):
            raise RenderError(f"{what}: no list index '{last}'")
        i = int(last)
        if kind == "add":
            parent.insert(i, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[i] = copy.deepcopy(op["value"])
        else:
            del parent[i]
    elif isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise RenderError(f"{what}: no key '{last}'")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
    else:
        raise RenderError(f"{what}: parent is a scalar")


def matches(doc, target):
    for key in ("kind", "name"):
        if key in target:
            value = doc["kind"] if key == "kind" else doc.get("metadata", {}).get("name")
            if value != target[key]:
                return False
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise RenderError(f"patch target fields {sorted(unknown)} are not supported (kind, name)")
    return True


def set_images(docs, images):
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec.get("jobTemplate", {}).get("spec", {}))
        for key in ("containers", "initContainers"):
            for c in pod.get(key, []) or []:
                name, _, tag = c.get("image", "").partition(":")
                for img in images:
                    if img["name"] == name:
                        c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"


def render(folder):
    path = os.path.join(folder, "kustomization.yaml")
    if not os.path.isfile(path):
        raise RenderError(f"{folder}: no kustomization.yaml")
    with open(path, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise RenderError(f"{path}: fields {sorted(unknown)} are not supported by this renderer ({sorted(SUPPORTED)})")
    if k.get("kind") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    docs = []
    for res in k.get("resources", []):
        full = os.path.normpath(os.path.join(folder, res))
        if os.path.isdir(full):
            docs.extend(render(full))
        elif os.path.isfile(full):
            docs.extend(load_documents(full))
        else:
            raise RenderError(f"{path}: resource '{res}' does not exist")
    for i, p in enumerate(k.get("patches", [])):
        where = f"{path}: patches[{i}]"
        ops = p.get("patch")
        if "path" in p:
            with open(os.path.join(folder, p["path"]), encoding="utf-8") as f:
                ops = f.read()
        ops = yaml.safe_load(ops) if isinstance(ops, str) else ops
        if not isinstance(ops, list):
            raise RenderError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
        hits = [d for d in docs if matches(d, p.get("target", {}))]
        if not hits:
            raise RenderError(f"{where}: target {p.get('target')} matches no object")
        for d in hits:
            for op in ops:
                apply_op(d, op, where)
    set_images(docs, k.get("images", []))
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--out")
    a = ap.parse_args()
    try:
        docs = render(a.folder)
    except (RenderError, OSError) as e:
        print(f"render-kustomization: {e}", file=sys.stderr)
        return 1
    text = yaml.safe_dump_all(docs, sort_keys=False)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, a.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
