//! The vocabulary every migmon crate shares: the units of every command line (durations, sizes and rates, with
//! one rule for a bare number), MAC addresses, and the names of the errnos a TCP connection meets.
//!
//! It depends on nothing platform-specific, so the analysis, the probes, the migrator, the testbed and xtask can all
//! use it.
//!
//! ```
//! use migmon_base::{MacAddr, units::{DurationArg, Size}};
//!
//! let settle: DurationArg = "250ms".parse().unwrap();
//! assert_eq!(settle.0, std::time::Duration::from_millis(250));
//! assert!("30".parse::<DurationArg>().is_err()); // a bare number has no unit
//! assert_eq!("32MiB".parse::<Size>().unwrap().0, 32 << 20);
//! let mac: MacAddr = "52:54:00:AB:CD:EF".parse().unwrap();
//! assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
//! ```

pub mod errno;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod mac;
pub mod units;

pub use errno::{Errno, errno_name};
pub use mac::{MacAddr, MacParseError};
pub use units::{DurationArg, Rate, Size, UnitError};
