//! The report of a run: per scenario what was injected, what was measured, each
//! check with its bound and value, pass or fail; written as `report.json` and
//! `report.md` (a summary table plus the checks) in the report directory.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub bound: String,
    pub value: String,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub injected: String,
    pub seconds: f64,
    /// The headline numbers for the summary table.
    pub headline: Vec<String>,
    pub measured: BTreeMap<String, Value>,
    pub checks: Vec<Check>,
    /// The scenario could not run to its end (setup failure, harness error).
    pub error: Option<String>,
    pub pass: bool,
}

impl ScenarioReport {
    pub fn new(name: &str, injected: &str) -> ScenarioReport {
        ScenarioReport {
            name: name.to_owned(),
            injected: injected.to_owned(),
            seconds: 0.0,
            headline: Vec::new(),
            measured: BTreeMap::new(),
            checks: Vec::new(),
            error: None,
            pass: false,
        }
    }

    pub fn measure(&mut self, key: &str, v: impl Serialize) {
        self.measured.insert(
            key.to_owned(),
            serde_json::to_value(v).unwrap_or(Value::Null),
        );
    }

    pub fn headline(&mut self, s: impl Into<String>) {
        self.headline.push(s.into());
    }

    pub fn check(
        &mut self,
        name: &str,
        bound: impl Into<String>,
        value: impl Into<String>,
        pass: bool,
    ) {
        self.checks.push(Check {
            name: name.to_owned(),
            bound: bound.into(),
            value: value.into(),
            pass,
        });
    }

    /// `value` must be at most `max`.
    pub fn check_max(&mut self, name: &str, value: f64, max: f64, unit: &str) {
        self.check(
            name,
            format!("<= {max}{unit}"),
            format!("{}{unit}", trim(value)),
            value <= max,
        );
    }

    /// A count that must be zero.
    pub fn check_zero(&mut self, name: &str, value: u64) {
        self.check(name, "0", value.to_string(), value == 0);
    }

    /// Sets `pass` from the checks (and the absence of a harness error).
    pub fn finish(&mut self) {
        self.pass =
            self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.pass);
    }
}

fn trim(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub size: String,
    pub started_unix_ms: u64,
    pub settings: Value,
    pub plan: Value,
    pub scenarios: Vec<ScenarioReport>,
    pub pass: bool,
}

impl RunReport {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# Fault-injection run ({} size): {}\n\n| scenario | injected | measured | checks | result |\n|---|---|---|---|---|\n",
            self.size,
            if self.pass { "PASS" } else { "FAIL" }
        );
        for r in &self.scenarios {
            let passed = r.checks.iter().filter(|c| c.pass).count();
            s.push_str(&format!(
                "| {} | {} | {} | {}/{} | {} |\n",
                cell(&r.name),
                cell(&r.injected),
                cell(&r.headline.join("; ")),
                passed,
                r.checks.len(),
                if r.pass { "PASS" } else { "**FAIL**" }
            ));
        }
        for r in &self.scenarios {
            s.push_str(&format!(
                "\n## {} ({:.0} s): {}\n\nInjected: {}\n\n",
                r.name,
                r.seconds,
                if r.pass { "PASS" } else { "FAIL" },
                r.injected
            ));
            if let Some(e) = &r.error {
                s.push_str(&format!("Harness error: `{}`\n\n", cell(e)));
            }
            s.push_str("| check | bound | measured | pass |\n|---|---|---|---|\n");
            for c in &r.checks {
                s.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    cell(&c.name),
                    cell(&c.bound),
                    cell(&c.value),
                    if c.pass { "yes" } else { "**NO**" }
                ));
            }
        }
        s
    }
}

/// Markdown table cells cannot hold `|` or newlines.
fn cell(s: &str) -> String {
    s.replace('|', "/").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_passes_only_with_checks_all_passing() {
        let mut r = ScenarioReport::new("x", "nothing");
        r.finish();
        assert!(!r.pass, "no checks is no proof");
        r.check_zero("lost", 0);
        r.check_max("p99", 12.5, 100.0, " ms");
        r.finish();
        assert!(r.pass);
        r.check_zero("dups", 1);
        r.finish();
        assert!(!r.pass);
        assert_eq!(r.checks[1].value, "12.50 ms");
    }

    #[test]
    fn markdown_escapes_cells() {
        let mut r = ScenarioReport::new("a|b", "x\ny");
        r.check_zero("c", 0);
        r.finish();
        let run = RunReport {
            size: "ci".into(),
            started_unix_ms: 0,
            settings: Value::Null,
            plan: Value::Null,
            scenarios: vec![r],
            pass: true,
        };
        let md = run.markdown();
        assert!(md.contains("| a/b | x y |"), "{md}");
    }
}
