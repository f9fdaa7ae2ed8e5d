"""The dashboard in a real headless browser: change controls, the figures and numbers change."""

import pytest

from compactbed.dashboards.app import create_app
from compactbed.simulator.costs import Calibration

from ..unit.test_dashboard_functions import folder  # noqa: F401  (results-folder fixture)

pytestmark = pytest.mark.slow


def set_number(dash_duo, selector, value):
    box = dash_duo.find_element(selector)
    box.clear()
    box.send_keys(str(value))
    box.send_keys("\n")


def test_whatif_controls_change_the_answer(dash_duo, folder):  # noqa: F811
    app = create_app([folder], Calibration.load())
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#curves .main-svg", timeout=20)
    dash_duo.wait_for_contains_text("#latency", " s", timeout=20)
    before = dash_duo.find_element("#latency").text
    title_before = dash_duo.find_element("#curves .gtitle").text
    set_number(dash_duo, "#nodes", 2)
    dash_duo.wait_for_contains_text("#curves .gtitle", "(2 nodes", timeout=20)
    assert dash_duo.find_element("#latency").text != before
    assert dash_duo.find_element("#curves .gtitle").text != title_before
    set_number(dash_duo, "#nodes", 3)                                  # 64 tokens do not split 3 ways
    dash_duo.wait_for_contains_text("#message", "divide", timeout=20)
    assert dash_duo.find_element("#latency").text == "-"
    set_number(dash_duo, "#nodes", 4)
    dash_duo.wait_for_text_to_equal("#message", "", timeout=20)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_results_tab_shows_measured_figures(dash_duo, folder):  # noqa: F811
    app = create_app([folder], Calibration.load())
    dash_duo.start_server(app)
    dash_duo.find_elements(".tab")[1].click()
    dash_duo.wait_for_element("#m-latency .main-svg", timeout=20)
    dash_duo.wait_for_contains_text("#m-predicted .gtitle", "MAPE", timeout=20)
    dash_duo.wait_for_contains_text("#m-pareto .gtitle", "quality vs latency", timeout=20)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()
