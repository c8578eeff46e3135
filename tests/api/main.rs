//! Integration tests: real HTTP against the app, on the embedded store and on
//! a private redis-server started by each test.

mod bad_input;
mod browser;
mod cli;
mod clients;
mod cluster;
mod contract;
mod engine;
mod faults;
mod fuzz;
mod grafana;
mod helpers;
mod http;
mod listing;
mod nodes;
mod ops;
mod pages;
mod readme;
mod reference;
mod reports;
mod seats;
mod startup;
mod store_contract;
mod usage;
mod webhooks;
