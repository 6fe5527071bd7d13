import pytest
from torch import nn

from lightning_compress.selection import ModuleSelection, select_modules


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.encoder = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)


def names(pairs):
    return [n for n, _ in pairs]


def test_select_by_type_in_stable_order():
    assert names(select_modules(Net(), [nn.Linear, nn.Conv2d])) == [
        "stem",
        "encoder.0.fc1",
        "encoder.0.fc2",
        "encoder.1.fc1",
        "encoder.1.fc2",
        "head",
    ]


def test_glob_and_regex_patterns():
    assert names(select_modules(Net(), "encoder.*.fc1")) == ["encoder.0.fc1", "encoder.1.fc1"]
    assert names(select_modules(Net(), r"re:encoder\.1\.fc\d")) == ["encoder.1.fc1", "encoder.1.fc2"]


def test_type_and_pattern_together_mean_both():
    assert names(select_modules(Net(), [nn.Linear, "encoder.1.*"])) == ["encoder.1.fc1", "encoder.1.fc2"]


def test_exclude_and_min_params():
    selected = select_modules(Net(), nn.Linear, exclude=["head", "encoder.0.*"], min_params=500)
    # fc1: 16*32+32 = 544 params, fc2: 32*16+16 = 528
    assert names(selected) == ["encoder.1.fc1", "encoder.1.fc2"]
    assert names(select_modules(Net(), nn.Linear, min_params=529)) == ["encoder.0.fc1", "encoder.1.fc1"]


def test_default_selects_modules_owning_parameters():
    assert names(select_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LayerNorm(2)))) == ["0", "2"]


def test_missing_name_suggests_close_matches():
    with pytest.raises(ValueError, match="no module named 'encoder.0.fc3'.*Did you mean .*'encoder.0.fc1'"):
        select_modules(Net(), "encoder.0.fc3")


def test_pattern_matching_nothing_names_the_argument():
    with pytest.raises(ValueError, match="`exclude`: no name 'decoder.\\*'"):
        select_modules(Net(), nn.Linear, exclude="decoder.*")


def test_empty_selection_lists_candidates():
    with pytest.raises(ValueError, match="matches no module.*'stem' \\(Conv2d\\)"):
        select_modules(Net(), nn.Conv1d)


@pytest.mark.parametrize("bad", [int, 3, nn.Linear(2, 2)])
def test_non_module_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="`modules` got"):
        ModuleSelection(modules=[bad])


def test_invalid_regex_and_min_params():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ModuleSelection(modules="re:enc(")
    with pytest.raises(ValueError, match="min_params"):
        ModuleSelection(min_params=-1)


@pytest.mark.parametrize("argument", ["modules", "exclude"])
def test_a_selector_that_is_neither_a_type_a_pattern_nor_a_list_names_the_argument(argument):
    with pytest.raises(
        TypeError, match=rf"`{argument}=3` must be a layer type, a name pattern, or a list of them"
    ):
        ModuleSelection(**{argument: 3})
