//! The provider contract against Tencent Cloud KMS, served by `envelope kms-emulator`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

envelope_tests::contract_suite!(envelope_tests::TencentTarget::new());
