//! Scenario programs and harness for vpstag's platform tests.
