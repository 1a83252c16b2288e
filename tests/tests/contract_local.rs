//! The provider contract against the local KMS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

envelope_tests::contract_suite!(envelope_tests::LocalTarget::new());
