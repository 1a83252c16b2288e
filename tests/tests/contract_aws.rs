//! The provider contract against AWS KMS, on the moto server of `ENVELOPE_TEST_MOTO_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

envelope_tests::contract_suite!(optional: envelope_tests::servers::AwsTarget::from_env);
