#!/usr/bin/env python3
"""Compile the Android demo's Java sources with javac against the real ExecuTorch and ONNX Runtime Java APIs.

No Android SDK is needed. The runtime API classes come from npm packages that bundle the Android libraries,
and the Android framework classes from the stubs in check/stubs/. The resource class R is generated from the
app's layout and string resources, so a Java reference to a missing view id or string also fails.

Downloads are cached in ${XDG_CACHE_HOME:-~/.cache}/g3n-export/android/. Exit status 0 means every source
compiled; 1 means a compile error or a failed API check; 2 means a missing tool or a failed download.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHECK_DIR = Path(__file__).resolve().parent
DEMO_DIR = CHECK_DIR.parent
APP_PACKAGE = "org.g3nexport.demo"
JAVA_RELEASE = "11"
ANDROID_NS = "{http://schemas.android.com/apk/res/android}"


@dataclass(frozen=True)
class NpmJar:
    """A Java API jar taken from a pinned npm package."""

    name: str
    package: str
    version: str
    integrity: str
    member: str
    # Path of classes.jar inside `member` when `member` is an AAR; None when `member` is the jar itself.
    aar_entry: str | None
    # javap class name and the signature fragments the app relies on.
    api_class: str
    api_signatures: tuple[str, ...]

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.package.replace('/', '_')}-{self.version}.jar"


# react-native-executorch 0.9.3 ships the ExecuTorch Java API as android/libs/classes.jar. Its LlmModule,
# LlmCallback and LlmGenerationConfig match the executorch-android 1.3.x sources (void generate/load, onError,
# constructors with a data path and BOS/EOS counts), so app/build.gradle pins executorch-android 1.3.1.
EXECUTORCH = NpmJar(
    name="executorch-android",
    package="react-native-executorch",
    version="0.9.3",
    integrity="sha512-eanpDe8sFFxbKfCh0lqrSVyU4/deiF1pZWtZOjZSV+w+qfuNsdrkQkoscxvhMwJOnvXNkBt4BXAr8pAlGOXStA==",
    member="package/android/libs/classes.jar",
    aar_entry=None,
    api_class="org.pytorch.executorch.extension.llm.LlmModule",
    api_signatures=(
        "LlmModule(int, java.lang.String, java.lang.String, float, java.lang.String, int, int)",
        "void generate(java.lang.String, int, org.pytorch.executorch.extension.llm.LlmCallback, boolean)",
    ),
)

# The ONNX Runtime plugin for Unity bundles onnxruntime-android's AAR; libonnxruntime.so in it reports 1.29.0,
# so app/build.gradle pins onnxruntime-android 1.29.0.
ONNXRUNTIME = NpmJar(
    name="onnxruntime-android",
    package="com.github.asus4.onnxruntime",
    version="0.4.9",
    integrity="sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg==",
    member="package/Plugins/Android/onnxruntime.aar",
    aar_entry="classes.jar",
    api_class="ai.onnxruntime.OrtSession",
    api_signatures=("ai.onnxruntime.OrtSession$Result run(java.util.Map<java.lang.String, ? extends ai.onnxruntime.OnnxTensorLike>)",),
)


class CheckError(Exception):
    """A failure with a message for the user; `exit_code` is the process exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "g3n-export" / "android"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        hint = {
            "javac": "install a JDK 11 or newer (Debian: apt-get install openjdk-17-jdk-headless)",
            "javap": "install a JDK 11 or newer (Debian: apt-get install openjdk-17-jdk-headless)",
            "npm": "install Node.js with npm (Debian: apt-get install npm)",
        }[name]
        raise CheckError(f"{name} not found on PATH; {hint}", 2)
    return path


def sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def download_jar(spec: NpmJar, target: Path) -> None:
    """Fetch the npm tarball with `npm pack`, verify its integrity and extract the API jar to `target`."""
    npm = require_tool("npm")
    print(f"Downloading {spec.package}@{spec.version} from npm for the {spec.name} Java API...", flush=True)
    with tempfile.TemporaryDirectory(prefix="g3n-npm-") as work:
        result = subprocess.run(
            [npm, "pack", f"{spec.package}@{spec.version}", "--pack-destination", work, "--silent"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if result.returncode != 0:
            raise CheckError(
                f"npm pack {spec.package}@{spec.version} failed (exit {result.returncode}):\n{result.stderr.strip()}",
                2,
            )
        tarballs = list(Path(work).glob("*.tgz"))
        if len(tarballs) != 1:
            raise CheckError(f"npm pack {spec.package}@{spec.version} left {len(tarballs)} tarballs in {work}", 2)
        actual = sri_sha512(tarballs[0])
        if actual != spec.integrity:
            raise CheckError(
                f"{tarballs[0].name} has integrity {actual}, expected {spec.integrity}; the registry served "
                "different bytes for a pinned version, so the check refuses to use them",
                2,
            )
        with tarfile.open(tarballs[0], "r:gz") as archive:
            try:
                member = archive.getmember(spec.member)
            except KeyError:
                raise CheckError(f"{spec.package}@{spec.version} has no {spec.member}", 2) from None
            source = archive.extractfile(member)
            if source is None:
                raise CheckError(f"{spec.member} in {spec.package}@{spec.version} is not a regular file", 2)
            extracted = Path(work) / "member"
            with source, extracted.open("wb") as out:
                shutil.copyfileobj(source, out)
        partial = target.with_suffix(".partial")
        if spec.aar_entry is None:
            shutil.copyfile(extracted, partial)
        else:
            with zipfile.ZipFile(extracted) as aar, aar.open(spec.aar_entry) as jar, partial.open("wb") as out:
                shutil.copyfileobj(jar, out)
        # Rename last, so an interrupted download never leaves a truncated jar in the cache.
        partial.replace(target)


def ensure_jar(spec: NpmJar) -> Path:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / spec.cache_name
    if target.is_file():
        print(f"Using cached {target}")
    else:
        download_jar(spec, target)
    return target


def check_api(spec: NpmJar, jar: Path) -> None:
    """Fail early with a clear message when the jar lacks a signature the app depends on."""
    javap = require_tool("javap")
    result = subprocess.run([javap, "-cp", str(jar), spec.api_class], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CheckError(f"{spec.api_class} not found in {jar}:\n{result.stderr.strip()}", 1)
    for signature in spec.api_signatures:
        if signature not in result.stdout:
            raise CheckError(f"{spec.api_class} in {jar} lacks `{signature}`; javap lists:\n{result.stdout}", 1)
    print(f"API check passed: {spec.api_class} ({spec.package}@{spec.version})")


def build_stub_jar(javac: str, out_dir: Path) -> Path:
    sources = sorted(str(path) for path in (CHECK_DIR / "stubs").rglob("*.java"))
    classes = out_dir / "stub-classes"
    classes.mkdir()
    run_javac(javac, ["--release", JAVA_RELEASE, "-d", str(classes), *sources], "stub android.jar")
    jar = out_dir / "android-stub.jar"
    with zipfile.ZipFile(jar, "w") as archive:
        for path in sorted(classes.rglob("*.class")):
            archive.write(path, path.relative_to(classes).as_posix())
    return jar


def java_identifier(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def generate_r_class(res_dir: Path, out_dir: Path) -> Path:
    """Write R.java with an id for every layout, string and @+id in the resources, as aapt2 would."""
    ids: set[str] = set()
    layouts: set[str] = set()
    strings: set[str] = set()
    for layout in sorted((res_dir / "layout").glob("*.xml")):
        layouts.add(java_identifier(layout.stem))
        for element in ElementTree.parse(layout).iter():
            for attribute, value in element.attrib.items():
                if attribute.startswith(ANDROID_NS) and value.startswith("@+id/"):
                    ids.add(java_identifier(value[len("@+id/"):]))
    for values in sorted((res_dir / "values").glob("*.xml")):
        for element in ElementTree.parse(values).getroot().iter("string"):
            strings.add(java_identifier(element.attrib["name"]))

    lines = [f"package {APP_PACKAGE};", "", "public final class R {"]
    next_id = 0x7F000001
    for kind, names in (("id", ids), ("layout", layouts), ("string", strings)):
        lines.append(f"    public static final class {kind} {{")
        for name in sorted(names):
            lines.append(f"        public static final int {name} = 0x{next_id:08x};")
            next_id += 1
        lines.append("    }")
    lines.append("}")
    path = out_dir / "gen" / APP_PACKAGE.replace(".", "/") / "R.java"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_javac(javac: str, arguments: list[str], description: str) -> str:
    result = subprocess.run([javac, *arguments], capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise CheckError(f"javac failed on the {description} (exit {result.returncode}):\n{output}", 1)
    return output


def compile_app(app_src: Path, classpath: list[Path]) -> int:
    javac = require_tool("javac")
    java_root = app_src / "java"
    sources = sorted(java_root.rglob("*.java"))
    if not sources:
        raise CheckError(f"No Java sources found under {java_root}", 1)

    with tempfile.TemporaryDirectory(prefix="g3n-android-check-") as work_name:
        work = Path(work_name)
        stub_jar = build_stub_jar(javac, work)
        r_class = generate_r_class(app_src / "res", work)
        classes = work / "classes"
        classes.mkdir()
        full_classpath = os.pathsep.join(str(path) for path in [stub_jar, *classpath])
        # -Xlint:all shows unchecked and deprecation warnings; -Xlint:-options hides the note that
        # --release 11 is old, and -Xlint:-classfile the missing fbjni annotation classes of the ExecuTorch jar.
        arguments = [
            "--release", JAVA_RELEASE,
            "-Xlint:all", "-Xlint:-options", "-Xlint:-classfile",
            "-encoding", "UTF-8",
            "-classpath", full_classpath,
            "-d", str(classes),
            str(r_class),
            *(str(path) for path in sources),
        ]
        output = run_javac(javac, arguments, f"app sources under {java_root}")
        if output:
            print(output)
    return len(sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--app-src",
        type=Path,
        default=DEMO_DIR / "app" / "src" / "main",
        help="app source set to compile, the folder with java/ and res/ (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    try:
        require_tool("javac")
        jars = []
        for spec in (EXECUTORCH, ONNXRUNTIME):
            jar = ensure_jar(spec)
            check_api(spec, jar)
            jars.append(jar)
        count = compile_app(args.app_src.resolve(), jars)
    except CheckError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return error.exit_code
    except subprocess.TimeoutExpired as error:
        print(f"FAILED: {' '.join(map(str, error.cmd))} timed out after {error.timeout} s", file=sys.stderr)
        return 2
    print(
        f"OK: compiled {count} Java sources under {args.app_src} with javac --release {JAVA_RELEASE} against "
        f"{EXECUTORCH.package}@{EXECUTORCH.version} (ExecuTorch Java API), "
        f"{ONNXRUNTIME.package}@{ONNXRUNTIME.version} (ONNX Runtime Java API) and the stub android.jar"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
