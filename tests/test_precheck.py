"""permcompile.precheck: argument checks that need neither torch nor the model."""
from __future__ import annotations

import pytest

from permcompile.errors import UsageError
from permcompile.precheck import check_range


@pytest.mark.parametrize("value", ["1,128,512", (1, 128, 512), [1, 128, 512], " 1, 128 ,512"])
def test_a_range_is_text_or_three_integers(value):
    assert check_range(value, "seq") == (1, 128, 512)


@pytest.mark.parametrize("value, why", [("1,2", "three integers"), ("a,b,c", "three integers"), (None, "three"),
                                        ((1, 2, 3, 4), "three"), ("0,1,2", "1 <= MIN"), ((4, 2, 8), "1 <= MIN")])
def test_a_bad_range_is_one_usage_error_naming_the_option(value, why):
    with pytest.raises(UsageError, match=f"--trt-profile seq must .*{why}"):
        check_range(value, "--trt-profile seq")
