"""Static checks of the Slicer extension layout, run without Slicer.

Slicer installs only the files a CMakeLists.txt lists, binds .ui widgets to
parameter-node fields by name at run time, and rejects a catalog entry whose name
differs from the CMake project. Mistakes in any of these surface only in a Slicer
build, so they are checked here: for every folder at the repository root whose
CMakeLists.txt calls ``slicerMacroBuildScriptedModule`` (modules, and with
``WITH_SUBDIR`` the ``neuroatrophy`` library package), and for the top-level files.
"""

import ast
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "neuroatrophy"
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}

# ------------------------------------------------------------------ CMake parsing


def _cmake_commands(path: Path):
    """``(name, [arguments])`` of every command in a CMake file (no control flow evaluation)."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    commands = []
    for match in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", text):
        depth, position = 1, match.end()
        while depth and position < len(text):
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            position += 1
        body = text[match.end():position - 1]
        arguments = [token.strip('"') for token in re.findall(r'"[^"]*"|[^\s"]+', body)]
        commands.append((match.group(1), arguments))
    return commands


def _expand(arguments, variables):
    expanded = []
    for argument in arguments:
        value = re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), argument)
        expanded.extend(value.split() if argument.startswith("${") and argument.endswith("}") else [value])
    return expanded


def _scripted_module_call(cmake_file: Path):
    """The parsed ``slicerMacroBuildScriptedModule`` call of a CMake file, or None."""
    variables = {}
    for name, arguments in _cmake_commands(cmake_file):
        if name.lower() == "set" and arguments:
            variables[arguments[0]] = _expand(arguments[1:], variables)
        elif name == "slicerMacroBuildScriptedModule":
            values = _expand(arguments, variables)
            keywords = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
            parsed, current = {"options": set()}, None
            for value in values:
                if value in ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"):
                    parsed["options"].add(value)
                    current = None
                elif value in keywords:
                    current = value
                    parsed.setdefault(current, [])
                elif current is not None:
                    parsed[current].append(value)
            return parsed
    return None


def _scripted_folders():
    folders = []
    for cmake_file in sorted(ROOT.glob("*/CMakeLists.txt")):
        call = _scripted_module_call(cmake_file)
        if call is not None:
            folders.append((cmake_file.parent, call))
    return folders


SCRIPTED = _scripted_folders()
MODULES = [(folder, call) for folder, call in SCRIPTED if "WITH_SUBDIR" not in call["options"]]
MODULE_IDS = [folder.name for folder, _ in MODULES]


def _files_under(folder: Path, exclude=("Testing",)):
    files = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or IGNORED_PARTS & set(relative.parts) or relative.parts[0] in exclude:
            continue
        if path.suffix == ".pyc" or path.name == "CMakeLists.txt":
            continue
        files.add(relative.as_posix())
    return files


def _listed(call):
    scripts = [s if s.endswith(".py") else s + ".py" for s in call.get("SCRIPTS", [])]
    return scripts, call.get("RESOURCES", [])


# ------------------------------------------------------------------ the top level


def test_there_is_a_module_and_the_library():
    assert "AtrophyNetwork" in MODULE_IDS
    assert (ROOT / LIBRARY) in [folder for folder, _ in SCRIPTED]


def test_top_level_cmake_matches_the_catalog_entry():
    commands = _cmake_commands(ROOT / "CMakeLists.txt")
    projects = [arguments[0] for name, arguments in commands if name == "project"]
    assert projects == ["NeuroAtrophy"]
    entry_file = ROOT / f"{projects[0]}.json"
    assert entry_file.is_file(), "the ExtensionsIndex entry must be named after the CMake project"

    raw = entry_file.read_bytes()
    assert b"\r" not in raw, f"{entry_file.name} must have LF line endings"
    entry = json.loads(raw)
    assert entry["category"] == "Neuroimaging"
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert re.match(r"(https|git)://", entry["scm_url"])

    settings = {arguments[0]: arguments[1:] for name, arguments in commands if name == "set" and arguments}
    assert settings["EXTENSION_CATEGORY"] == [entry["category"]]
    assert settings["EXTENSION_DEPENDS"] == ["NA"] and "build_dependencies" not in entry
    homepage = settings["EXTENSION_HOMEPAGE"][0]
    assert entry["scm_url"].removesuffix(".git") == homepage


def test_top_level_cmake_adds_every_scripted_folder_and_nothing_missing():
    commands = _cmake_commands(ROOT / "CMakeLists.txt")
    added = [arguments[0] for name, arguments in commands if name == "add_subdirectory"]
    assert sorted(added) == sorted(folder.name for folder, _ in SCRIPTED)
    assert added.index(LIBRARY) < min(added.index(m) for m in MODULE_IDS), "the library comes before the modules"
    names = [name for name, _ in commands]
    assert names.index("find_package") < names.index("add_subdirectory")


def test_icon_is_a_128_pixel_png_in_the_repository():
    commands = _cmake_commands(ROOT / "CMakeLists.txt")
    settings = {arguments[0]: arguments[1:] for name, arguments in commands if name == "set" and arguments}
    url = settings["EXTENSION_ICONURL"][0]
    prefix = "https://raw.githubusercontent.com/neuroatrophy/SlicerNeuroAtrophy/main/"
    assert url.startswith(prefix)
    icon = ROOT / url[len(prefix):]
    assert _png_size(icon) == (128, 128)
    assert all(s.startswith(prefix) for s in settings["EXTENSION_SCREENSHOTURLS"])


def test_licence_file_in_the_root():
    licence = ROOT / "LICENSE"
    assert "Apache License" in licence.read_text(encoding="utf-8")[:200]


def _png_size(path: Path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", header[16:24])


# ------------------------------------------------------------------ listed files


@pytest.mark.parametrize(("folder", "call"), SCRIPTED, ids=[folder.name for folder, _ in SCRIPTED])
def test_every_listed_file_exists_and_every_file_is_listed(folder, call):
    scripts, resources = _listed(call)
    listed = scripts + resources
    assert len(listed) == len(set(listed)), f"{folder.name}/CMakeLists.txt lists a file twice"
    missing = [name for name in listed if not (folder / name).is_file()]
    assert not missing, f"{folder.name}/CMakeLists.txt lists files that do not exist: {missing}"
    unlisted = sorted(_files_under(folder) - set(listed))
    assert not unlisted, f"files in {folder.name}/ that its CMakeLists.txt does not install: {unlisted}"
    assert all(name.endswith(".py") for name in scripts)
    assert not [name for name in resources if name.endswith(".py")], "Python files go in SCRIPTS"


@pytest.mark.parametrize(("folder", "call"), MODULES, ids=MODULE_IDS)
def test_module_layout(folder, call):
    name = call["NAME"][0]
    assert folder.name == name
    scripts, resources = _listed(call)
    assert f"{name}.py" in scripts
    assert f"Resources/Icons/{name}.png" in resources or f"Resources/Icons/{name}.svg" in resources
    assert "WITH_GENERIC_TESTS" in call["options"]
    commands = _cmake_commands(folder / "CMakeLists.txt")
    unittests = [arguments for command, arguments in commands if command == "slicer_add_python_unittest"]
    assert ["SCRIPT", f"{name}.py"] in [_expand(a, {"MODULE_NAME": [name]}) for a in unittests]
    for cmake_file in (folder / "Testing").rglob("CMakeLists.txt"):
        for command, arguments in _cmake_commands(cmake_file):
            if command == "add_subdirectory":
                assert (cmake_file.parent / arguments[0] / "CMakeLists.txt").is_file()
            if command in ("slicer_add_python_unittest", "slicer_add_python_test"):
                assert (cmake_file.parent / arguments[arguments.index("SCRIPT") + 1]).is_file()


@pytest.mark.parametrize(("folder", "call"), MODULES, ids=MODULE_IDS)
def test_module_python_files_compile(folder, call, tmp_path):
    for path in sorted(folder.rglob("*.py")):
        if IGNORED_PARTS & set(path.parts):
            continue
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


# ------------------------------------------------------------------ .ui bindings

# Widget classes and the field types they can show (Slicer's parameterNodeWrapper/guiConnectors.py).
WIDGET_TYPES = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"}, "QPushButton": {"bool"}, "ctkCheckablePushButton": {"bool"},
    "QSpinBox": {"int"}, "QSlider": {"int"},
    "QDoubleSpinBox": {"float", "int"}, "ctkSliderWidget": {"float", "int"}, "qMRMLSliderWidget": {"float", "int"},
    "ctkDoubleSlider": {"float", "int"}, "ctkDoubleSpinBox": {"float", "int"}, "qMRMLSpinBox": {"float", "int"},
    "QComboBox": {"choice", "enum"}, "ctkComboBox": {"choice", "enum"},
    "QLineEdit": {"str"}, "QTextEdit": {"str"}, "QLabel": {"str"},
    "ctkPathLineEdit": {"path"}, "ctkDirectoryButton": {"path"},
    "qMRMLNodeComboBox": {"node"},
    "ctkRangeWidget": {"FloatRange"}, "ctkDoubleRangeSlider": {"FloatRange"}, "qMRMLRangeWidget": {"FloatRange"},
    "ctkColorPickerButton": {"QColor"},
}
# These widgets need a bounded number (WithinRange, or Minimum and Maximum).
NEEDS_BOUNDS = {"ctkSliderWidget", "qMRMLSliderWidget"}
PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return ast.unparse(node)


def _field_kind(annotation, enums) -> tuple[str, set]:
    """The kind of a parameter annotation (bool, int, float, str, path, node, enum, choice, ...) and its validators."""
    validators = set()
    if isinstance(annotation, ast.Subscript) and _dotted(annotation.value).split(".")[-1] == "Annotated":
        elements = annotation.slice.elts
        annotation = elements[0]
        validators = {_dotted(e.func).split(".")[-1] for e in elements[1:] if isinstance(e, ast.Call)}
    members = _union_members(annotation)
    names = {_dotted(m).split(".")[-1] for m in members} - {"None"}
    if names and all(n.startswith("vtkMRML") for n in names):
        return "node", validators
    (name,) = names
    if name in PATH_TYPES:
        return "path", validators
    if name in enums:
        return "enum", validators
    if "Choice" in validators:
        return "choice", validators
    return name, validators


def _union_members(annotation):
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _union_members(annotation.left) + _union_members(annotation.right)
    if isinstance(annotation, ast.Subscript) and _dotted(annotation.value).split(".")[-1] in ("Union", "Optional"):
        inner = annotation.slice
        return [m for e in (inner.elts if isinstance(inner, ast.Tuple) else [inner]) for m in _union_members(e)]
    return [annotation]


def _parameter_fields(module_file: Path):
    """``{field: (kind, validators)}`` of the module's @parameterNodeWrapper class, and the parsed module."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    enums = {
        node.name for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Enum") for b in node.bases)
    }
    wrappers = [
        node for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(_dotted(d).endswith("parameterNodeWrapper") for d in node.decorator_list)
    ]
    assert len(wrappers) == 1, f"{module_file.name} must define one @parameterNodeWrapper class"
    fields = {
        statement.target.id: _field_kind(statement.annotation, enums)
        for statement in wrappers[0].body
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
    }
    return fields, tree


def _ui_bindings(ui_file: Path):
    """``[(widget class, widget name, parameter name)]`` of every widget with a SlicerParameterName property."""
    root = ET.parse(ui_file).getroot()
    bindings = []
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.append((widget.get("class"), widget.get("name"), prop.findtext("string")))
    return root, bindings


def _assigned_attributes(tree) -> set:
    """Attribute names assigned anywhere in the module, e.g. ``parameterNode.region = ...``."""
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        names |= {t.attr for t in targets if isinstance(t, ast.Attribute)}
    return names


def _binding_problems(folder: Path, call) -> list:
    """What is wrong with the module's .ui bindings and parameter-node fields."""
    name = call["NAME"][0]
    fields, tree = _parameter_fields(folder / f"{name}.py")
    ui_files = [folder / r for r in _listed(call)[1] if r.endswith(".ui")]
    if not ui_files:
        return [f"{name} lists no .ui file"]
    bound, problems = set(), []
    for ui_file in ui_files:
        root, bindings = _ui_bindings(ui_file)
        if ui_file.stem == name and root.find("widget").get("class") != "qMRMLWidget":
            problems.append(f"{ui_file.name}: the top-level widget must be a qMRMLWidget")
        for widget_class, widget_name, parameter in bindings:
            if parameter not in fields:
                problems.append(f"{ui_file.name}: widget {widget_name} binds unknown parameter {parameter!r}")
                continue
            bound.add(parameter)
            kind, validators = fields[parameter]
            allowed = WIDGET_TYPES.get(widget_class)
            if allowed is None:
                problems.append(f"{ui_file.name}: widget {widget_name} ({widget_class}) cannot be bound to a parameter")
            elif kind not in allowed:
                problems.append(f"{ui_file.name}: widget {widget_name} ({widget_class}) cannot show {parameter!r} "
                                f"of kind {kind}; it shows {sorted(allowed)}")
            elif widget_class in NEEDS_BOUNDS and not ("WithinRange" in validators
                                                       or {"Minimum", "Maximum"} <= validators):
                problems.append(f"{ui_file.name}: {widget_class} {widget_name} needs {parameter!r} to be bounded")
        names = [parameter for _, _, parameter in bindings]
        duplicates = sorted({parameter for parameter in names if names.count(parameter) > 1})
        if duplicates:
            problems.append(f"{ui_file.name}: parameters bound to several widgets: {duplicates}")
    # A field that no widget shows and no code sets is dead weight, or a binding that was lost.
    unused = sorted(set(fields) - bound - _assigned_attributes(tree))
    if unused:
        problems.append(f"parameters neither bound to a widget nor set in code: {unused}")
    return problems


@pytest.mark.parametrize(("folder", "call"), MODULES, ids=MODULE_IDS)
def test_ui_bindings_name_fields_of_compatible_types(folder, call):
    problems = _binding_problems(folder, call)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("folder", "call"), MODULES, ids=MODULE_IDS)
def test_ui_widgets_used_in_code_exist(folder, call):
    name = call["NAME"][0]
    source = (folder / f"{name}.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    names = set()
    for ui_file in (folder / r for r in _listed(call)[1] if r.endswith(".ui")):
        names |= {w.get("name") for w in ET.parse(ui_file).getroot().iter("widget")}
    assert not sorted(used - names), f"{name}.py uses widgets missing from its .ui: {sorted(used - names)}"


# ------------------------------------------------------------------ the library stays Qt-free

FORBIDDEN_MODULES = {"qt", "ctk", "slicer.app", "slicer.modules", "slicer.util.mainWindow"}
MRML_ONLY_MODULES = {"slicer", "vtk"}
MRML_BRIDGE = "mrml.py"


def _library_files():
    return sorted(p for p in (ROOT / LIBRARY).rglob("*.py") if not IGNORED_PARTS & set(p.parts))


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_library_does_not_import_qt_or_slicer_application(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        imported = []
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and _dotted(node) in ("slicer.app", "slicer.modules"):
            problems.append(f"line {node.lineno}: uses {_dotted(node)}")
        for module in imported:
            top = module.split(".")[0]
            if module in FORBIDDEN_MODULES or top in {"qt", "ctk", "PythonQt"}:
                problems.append(f"line {node.lineno}: imports {module}")
            elif top in MRML_ONLY_MODULES and path.name != MRML_BRIDGE:
                problems.append(f"line {node.lineno}: imports {module} (only neuroatrophy/mrml.py may)")
    assert not problems, f"{LIBRARY}/{path.name}: " + "; ".join(problems)


# ------------------------------------------------------------------ the checks themselves


def test_checks_catch_an_unlisted_file_and_bad_bindings(tmp_path):
    """The helpers find what they must: a guard against checks that cannot fail."""
    module = tmp_path / "Demo"
    (module / "Resources" / "UI").mkdir(parents=True)
    (module / "CMakeLists.txt").write_text(
        "set(MODULE_NAME Demo)\nset(MODULE_PYTHON_SCRIPTS ${MODULE_NAME}.py)\n"
        "slicerMacroBuildScriptedModule(NAME ${MODULE_NAME} SCRIPTS ${MODULE_PYTHON_SCRIPTS}\n"
        "  RESOURCES Resources/UI/Demo.ui WITH_GENERIC_TESTS)  # comment (with a parenthesis\n"
    )
    (module / "Demo.py").write_text(
        "import pathlib\nfrom typing import Annotated\n"
        "@parameterNodeWrapper\nclass DemoParameterNode:\n"
        "    table: pathlib.Path\n    level: Annotated[float, WithinRange(0, 1)] = 0.5\n"
        "    free: float = 1.0\n    mode: str = 'a'\n    unused: int = 0\n    setInCode: str = ''\n"
        "    node: vtkMRMLModelNode | None\n"
        "def f(p):\n    p.setInCode = 'x'\n"
    )
    binding = '<widget class="{0}" name="{1}"><property name="SlicerParameterName" stdset="0">' \
              "<string>{2}</string></property></widget>"
    (module / "Resources" / "UI" / "Demo.ui").write_text(
        '<ui version="4.0"><widget class="qMRMLWidget" name="Demo">'
        + binding.format("QCheckBox", "tableCheckBox", "table")
        + binding.format("ctkSliderWidget", "freeSlider", "free")
        + binding.format("QComboBox", "modeCombo", "mode")
        + binding.format("qMRMLNodeComboBox", "nodeCombo", "node")
        + binding.format("QLineEdit", "ghostEdit", "ghost")
        + "</widget></ui>"
    )
    (module / "Extra.py").write_text("")

    call = _scripted_module_call(module / "CMakeLists.txt")
    assert call["NAME"] == ["Demo"] and call["SCRIPTS"] == ["Demo.py"]
    assert call["RESOURCES"] == ["Resources/UI/Demo.ui"] and call["options"] == {"WITH_GENERIC_TESTS"}
    scripts, resources = _listed(call)
    assert _files_under(module) - set(scripts + resources) == {"Extra.py"}

    problems = _binding_problems(module, call)

    assert problems == [
        "Demo.ui: widget tableCheckBox (QCheckBox) cannot show 'table' of kind path; it shows ['bool']",
        "Demo.ui: ctkSliderWidget freeSlider needs 'free' to be bounded",
        "Demo.ui: widget modeCombo (QComboBox) cannot show 'mode' of kind str; it shows ['choice', 'enum']",
        "Demo.ui: widget ghostEdit binds unknown parameter 'ghost'",
        "parameters neither bound to a widget nor set in code: ['level', 'unused']",
    ]


def test_library_import_check_finds_forbidden_imports(tmp_path):
    package = tmp_path / LIBRARY
    package.mkdir()
    (package / "bad.py").write_text("import qt\nfrom slicer import util\nimport slicer\nx = slicer.app\n")
    with pytest.raises(AssertionError, match=r"imports qt; line 2: imports slicer .*line 4: uses slicer.app"):
        test_library_does_not_import_qt_or_slicer_application(package / "bad.py")
