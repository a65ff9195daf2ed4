#include "qmp/capabilities.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <cstring>
#include <unordered_map>

#include "qmp/commands.hpp"

namespace qmp {
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

// Names the schema uses; QMP spellings stay in this module and qmp/commands.
constexpr std::string_view kDisplayUpdate = "display-update";
constexpr std::string_view kChangeMedium = "blockdev-change-medium";
constexpr std::string_view kRunWith = "run-with";

// The introspection entities of query-qmp-schema, by name.
class Schema {
 public:
  static Result<Schema> index(const json::value& v) {
    const json::array* a = v.if_array();
    if (a == nullptr) return Error{errc::bad_reply, "query-qmp-schema: reply is not an array"};
    Schema s;
    s.by_name_.reserve(a->size());
    for (const json::value& e : *a) {
      const json::object* o = e.if_object();
      const json::value* name = o != nullptr ? o->if_contains("name") : nullptr;
      const json::value* meta = o != nullptr ? o->if_contains("meta-type") : nullptr;
      if (name == nullptr || !name->is_string() || meta == nullptr || !meta->is_string()) {
        return Error{errc::bad_reply, "query-qmp-schema: entity without name or meta-type"};
      }
      s.by_name_.emplace(std::string_view(name->get_string()), o);
      if (meta->get_string() == "command") s.commands_.emplace_back(name->get_string());
      if (meta->get_string() == "event") s.events_.emplace_back(name->get_string());
    }
    std::sort(s.commands_.begin(), s.commands_.end());
    std::sort(s.events_.begin(), s.events_.end());
    return s;
  }

  const json::object* entity(std::string_view name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : it->second;
  }

  // The entity a string field of `o` names (e.g. "arg-type", "element-type").
  const json::object* follow(const json::object* o, std::string_view field) const {
    if (o == nullptr) return nullptr;
    const json::value* v = o->if_contains(field);
    return v != nullptr && v->is_string() ? entity(v->get_string()) : nullptr;
  }

  const json::object* command_args(std::string_view command) const {
    return follow(entity(command), "arg-type");
  }

  // A member of an object type (base members are flattened into "members").
  static const json::object* member(const json::object* type, std::string_view name) {
    if (type == nullptr) return nullptr;
    const json::value* ms = type->if_contains("members");
    if (ms == nullptr || !ms->is_array()) return nullptr;
    for (const json::value& m : ms->get_array()) {
      const json::object* mo = m.if_object();
      const json::value* n = mo != nullptr ? mo->if_contains("name") : nullptr;
      if (n != nullptr && n->is_string() && n->get_string() == name) return mo;
    }
    return nullptr;
  }

  // The object type of variant `which` of a union.
  const json::object* variant(const json::object* type, std::string_view which) const {
    if (type == nullptr) return nullptr;
    const json::value* vs = type->if_contains("variants");
    if (vs == nullptr || !vs->is_array()) return nullptr;
    for (const json::value& v : vs->get_array()) {
      const json::object* vo = v.if_object();
      const json::value* c = vo != nullptr ? vo->if_contains("case") : nullptr;
      if (c != nullptr && c->is_string() && c->get_string() == which) return follow(vo, "type");
    }
    return nullptr;
  }

  // Whether enum type `e` has value `value` ("values" up to 8.x, "members" from 8.0 on).
  static bool enum_has(const json::object* e, std::string_view value) {
    if (e == nullptr) return false;
    if (const json::value* vs = e->if_contains("values"); vs != nullptr && vs->is_array()) {
      for (const json::value& v : vs->get_array()) {
        if (v.is_string() && v.get_string() == value) return true;
      }
    }
    return member(e, value) != nullptr;
  }

  std::vector<std::string> commands_;
  std::vector<std::string> events_;

 private:
  std::unordered_map<std::string_view, const json::object*> by_name_;
};

bool display_update_vnc_fd(const Schema& s) {
  const json::object* vnc = s.variant(s.command_args(kDisplayUpdate), "vnc");
  const json::object* list = s.follow(Schema::member(vnc, "addresses"), "type");
  const json::object* addr = s.follow(list, "element-type");
  if (addr == nullptr) return false;
  const json::value* tag = addr->if_contains("tag");
  if (tag == nullptr || !tag->is_string()) return false;
  const json::object* kinds = s.follow(Schema::member(addr, tag->get_string()), "type");
  return Schema::enum_has(kinds, "fd") && s.variant(addr, "fd") != nullptr;
}

void run_with_flags(const json::value* reply, Capabilities& c) {
  const json::array* a = reply != nullptr ? reply->if_array() : nullptr;
  if (a == nullptr) return;
  for (const json::value& e : *a) {
    const json::object* o = e.if_object();
    const json::value* opt = o != nullptr ? o->if_contains("option") : nullptr;
    if (opt == nullptr || !opt->is_string() || opt->get_string() != kRunWith) continue;
    c.run_with = true;
    const json::value* params = o->if_contains("parameters");
    if (params == nullptr || !params->is_array()) continue;
    for (const json::value& p : params->get_array()) {
      const json::object* po = p.if_object();
      const json::value* n = po != nullptr ? po->if_contains("name") : nullptr;
      if (n != nullptr && n->is_string() && n->get_string() == "user") c.run_with_user = true;
    }
  }
}

bool sorted_contains(const std::vector<std::string>& v, std::string_view s) {
  auto it = std::lower_bound(v.begin(), v.end(), s,
                             [](const std::string& a, std::string_view b) { return a < b; });
  return it != v.end() && *it == s;
}

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);

}  // namespace

bool Capabilities::has_command(std::string_view name) const {
  return sorted_contains(commands, name);
}
bool Capabilities::has_event(std::string_view name) const {
  return sorted_contains(events, name);
}

Result<Capabilities> derive_capabilities(const Version& version, const json::value& schema,
                                         const json::value* run_with) {
  auto s = Schema::index(schema);
  if (!s) return s.error();
  Capabilities c;
  c.version = version;
  c.display_update_vnc_fd = display_update_vnc_fd(*s);
  run_with_flags(run_with, c);
  // Not visible in the schema: behaviour changes documented by QEMU, keyed on the version.
  c.fdset_explicit_remove = version.at_least(9, 1);
  c.file_migration_fdset = version.at_least(8, 2);
  const json::object* cm = s->command_args(kChangeMedium);
  c.change_medium.id = Schema::member(cm, "id") != nullptr;
  c.change_medium.device = Schema::member(cm, "device") != nullptr;
  c.change_medium.read_only_mode = Schema::member(cm, "read-only-mode") != nullptr;
  c.change_medium.force = Schema::member(cm, "force") != nullptr;
  c.commands = std::move(s->commands_);
  c.events = std::move(s->events_);
  return c;
}

asio::awaitable<Result<Capabilities>> probe_capabilities(Client& client, Deadline deadline) {
  auto v = co_await client.execute(cmd::query_version(), deadline);
  if (!v) co_return v.error();
  auto version = reply::version(*v);
  if (!version) co_return version.error();
  auto schema = co_await client.execute(cmd::query_qmp_schema(), deadline);
  if (!schema) co_return schema.error();
  auto rw = co_await client.execute(cmd::query_command_line_options(kRunWith), deadline);
  // QEMU refuses the query for an option it does not have.
  if (!rw && !rw.error().is(errc::command_failed)) co_return rw.error();
  co_return derive_capabilities(*version, *schema, rw ? &*rw : nullptr);
}

Result<BinaryId> BinaryId::of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return Error{errc::io_error, "stat " + path + ": " + std::strerror(errno)};
  }
  BinaryId id;
  id.dev = st.st_dev;
  id.ino = st.st_ino;
  id.size = static_cast<std::int64_t>(st.st_size);
  id.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  return id;
}

struct CapabilityCache::Entry {
  Ptr caps;
  bool probing = false;
  std::vector<asio::steady_timer*> waiters;

  void wake() {
    for (asio::steady_timer* t : waiters) t->cancel();
  }
};

CapabilityCache::Ptr CapabilityCache::find(const BinaryId& binary) const {
  auto it = entries_.find(binary);
  return it == entries_.end() ? nullptr : it->second->caps;
}

void CapabilityCache::insert(const BinaryId& binary, Capabilities caps) {
  auto e = std::make_shared<Entry>();
  e->caps = std::make_shared<const Capabilities>(std::move(caps));
  entries_[binary] = std::move(e);
}

asio::awaitable<Result<CapabilityCache::Ptr>> CapabilityCache::get(BinaryId key, Client& client,
                                                                   Deadline deadline) {
  for (;;) {
    auto it = entries_.find(key);
    if (it != entries_.end() && it->second->caps) co_return it->second->caps;
    if (it != entries_.end() && it->second->probing) {
      // Another coroutine is probing this binary: wait for its result.
      std::shared_ptr<Entry> e = it->second;
      asio::steady_timer timer(co_await asio::this_coro::executor, deadline);
      e->waiters.push_back(&timer);
      auto [ec] = co_await timer.async_wait(kAwait);
      std::erase(e->waiters, &timer);
      if (e->caps) co_return e->caps;
      if (e->probing) {
        if (!ec) co_return Error{errc::timeout, "capabilities: probe still running at deadline"};
        auto state = co_await asio::this_coro::cancellation_state;
        if (state.cancelled() != asio::cancellation_type::none) {
          co_return Error{errc::cancelled, "capabilities: wait cancelled"};
        }
      }
      continue;  // the probe failed: try again on our own client
    }

    auto e = std::make_shared<Entry>();
    e->probing = true;
    entries_[key] = e;
    ++probes_;
    // However this frame ends, the entry stops probing and its waiters are woken.
    struct Finish {
      CapabilityCache& cache;
      const BinaryId& key;
      std::shared_ptr<Entry> e;
      ~Finish() {
        e->probing = false;
        if (!e->caps) {
          auto it = cache.entries_.find(key);
          if (it != cache.entries_.end() && it->second == e) cache.entries_.erase(it);
        }
        e->wake();
      }
    } finish{*this, key, e};
    auto r = co_await probe_capabilities(client, deadline);
    if (!r) co_return r.error().with_context("capabilities");
    e->caps = std::make_shared<const Capabilities>(std::move(*r));
    co_return e->caps;
  }
}

}  // namespace qmp
