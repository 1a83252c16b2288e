//! The provider contract against Vault Transit, on the OpenBao server of
//! `ENVELOPE_TEST_OPENBAO_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

envelope_tests::contract_suite!(optional: envelope_tests::servers::VaultTarget::from_env);
