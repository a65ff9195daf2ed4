// Fuzz target for what the broker reads out of QMP messages once the wire layer has framed them:
// the typed reply views (qmp::reply::*), the capability detector (query-qmp-schema,
// query-command-line-options) and the event predicates the flows wait on. A QEMU is a guest-facing
// process and may be compromised, so every reply is hostile input.
//
// Input: one QMP line, read by qmp::parse_message with the client's limits. A "return" value goes
// to every reply view and to the capability detector, an event to every predicate. A line that is
// JSON but no QMP message is fed to the views as a bare value too, so the fuzzer need not keep
// the envelope intact.
//
// Invariants checked (a violation aborts): no view throws; a parsed message nests no deeper than
// Limits::max_depth; views that succeed give values within their types' ranges (fd numbers and
// fdset ids as QEMU writes them are not checked: QEMU may send any integer).
#include <algorithm>
#include <boost/json/parse.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <variant>

#include "qmp/capabilities.hpp"
#include "qmp/commands.hpp"
#include "qmp/wire.hpp"

namespace {

namespace json = boost::json;

void check(bool ok) {
  if (!ok) std::abort();
}

std::size_t depth(const json::object& o);

std::size_t depth(const json::value& v) {
  std::size_t deepest = 0;
  if (const auto* a = v.if_array()) {
    for (const auto& e : *a) deepest = std::max(deepest, depth(e));
    return deepest + 1;
  }
  if (const auto* o = v.if_object()) return depth(*o);
  return 0;
}

// An event's data is an object: measured where it is, not copied into a value first.
std::size_t depth(const json::object& o) {
  std::size_t deepest = 0;
  for (const auto& kv : o) deepest = std::max(deepest, depth(kv.value()));
  return deepest + 1;
}

void views(const json::value& v, const qmp::Limits& limits) {
  check(depth(v) <= limits.max_depth);
  (void)qmp::reply::add_fd(v);
  (void)qmp::reply::status(v);
  (void)qmp::reply::fdsets(v);
  (void)qmp::reply::block(v);
  (void)qmp::reply::migration(v);
  (void)qmp::reply::block_jobs(v);
  (void)qmp::reply::command_names(v);
  (void)qmp::reply::qom_list(v);
  auto version = qmp::reply::version(v);
  // The capability detector gets the value as the schema and as the run-with reply, with the
  // version it claims (or QEMU 7.2's, the oldest the broker supports).
  qmp::Version as_version = version ? *version : qmp::Version{7, 2, 0, ""};
  auto caps = qmp::derive_capabilities(as_version, v, &v);
  if (caps) {
    check(std::is_sorted(caps->commands.begin(), caps->commands.end()));
    check(std::is_sorted(caps->events.begin(), caps->events.end()));
    check(!caps->run_with_user || caps->run_with);
  }
  (void)qmp::derive_capabilities(as_version, v, nullptr);
}

// The predicates are built once: building them is the same for every input, and each is a
// std::function holding a copy of its argument.
void predicates(const qmp::Event& e) {
  static const qmp::event::Predicate kPredicates[] = {
      qmp::event::named(qmp::event::kStop),
      qmp::event::device_deleted("cd0"),
      qmp::event::device_deleted("/machine/peripheral/disk1/virtio-backend"),
      qmp::event::tray_moved("cd0"),
      qmp::event::tray_moved("cd0", true),
      qmp::event::tray_moved("cd0", false),
      qmp::event::migration_status("completed"),
      qmp::event::migration_status("failed")};
  for (const auto& p : kPredicates) (void)p(e);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view line(reinterpret_cast<const char*>(data), size);
  const qmp::Limits limits;
  if (line.size() > limits.max_line) return 0;  // the line decoder refuses it before parsing
  auto msg = qmp::parse_message(line, limits);
  if (msg) {
    if (const auto* r = std::get_if<qmp::Return>(&*msg)) views(r->value, limits);
    if (const auto* e = std::get_if<qmp::Event>(&*msg)) {
      check(depth(e->data) <= limits.max_depth);
      predicates(*e);
    }
    return 0;
  }
  json::parse_options opts;
  opts.max_depth = limits.max_depth;
  boost::system::error_code ec;
  json::value v = json::parse(line, ec, json::storage_ptr(), opts);
  if (!ec) views(v, limits);
  return 0;
}
