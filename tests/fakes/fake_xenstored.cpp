#include "fake_xenstored.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <thread>

#include "fdpass/unique_fd.hpp"
#include "xs_wire.hpp"

namespace qbtest {
namespace {

using fdpass::UniqueFd;

std::string parent_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == 0 ? "/" : path.substr(0, slash);
}

// `path` is `base` or lies below it.
bool is_under(std::string_view path, std::string_view base) {
  if (base == "/" || path == base) return true;
  return path.size() > base.size() && path.starts_with(base) && path[base.size()] == '/';
}

// docs/misc/xenstore.txt: absolute, [A-Za-z0-9/_@-], no empty component, at most 3072 bytes.
bool valid_path(std::string_view p) {
  if (p.empty() || p[0] != '/' || p.size() > 3072) return false;
  if (p == "/") return true;
  if (p.back() == '/' || p.find("//") != std::string_view::npos) return false;
  return std::all_of(p.begin(), p.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '_' || c == '@' ||
           c == '-';
  });
}

// A decimal number of at most 9 digits (enough for a domid or a byte offset).
std::optional<std::uint32_t> parse_number(std::string_view s) {
  if (s.empty() || s.size() > 9) return std::nullopt;
  if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  return static_cast<std::uint32_t>(std::stoul(std::string(s)));
}

bool valid_domid(std::string_view s) {
  const auto n = parse_number(s);
  return n && *n <= 65535;
}

bool valid_perm(std::string_view w) {
  return w.size() >= 2 && std::string_view("nrwb").find(w[0]) != std::string_view::npos &&
         valid_domid(w.substr(1));
}

struct Node {
  std::string value;
  std::vector<std::string> perms;
  std::uint64_t gen = 0;  // the tree's generation at this node's last change (or a child's)
};

// What a change did, for firing watches: the path, and whether a subtree went away.
struct Change {
  std::string path;
  bool removed = false;
};

class Tree {
 public:
  Tree() { nodes_["/"] = Node{"", {"n0"}, 0}; }

  const Node* find(const std::string& p) const {
    const auto it = nodes_.find(p);
    return it == nodes_.end() ? nullptr : &it->second;
  }
  std::vector<std::string> children(const std::string& p) const {
    const std::string prefix = p == "/" ? "/" : p + "/";
    std::vector<std::string> names;
    for (auto it = nodes_.lower_bound(prefix); it != nodes_.end(); ++it) {
      if (!it->first.starts_with(prefix)) break;
      const std::string name = it->first.substr(prefix.size());
      if (!name.empty() && name.find('/') == std::string::npos) names.push_back(name);
    }
    std::sort(names.begin(), names.end());
    return names;
  }
  // The generation of the last change to `p`, present or removed (0: never existed).
  std::uint64_t changed_at(const std::string& p) const {
    if (const Node* n = find(p)) return n->gen;
    const auto it = removed_.find(p);
    return it == removed_.end() ? 0 : it->second;
  }
  std::uint64_t generation() const { return gen_; }

  Change write(const std::string& p, const std::string& value) {
    create(p);
    nodes_[p].value = value;
    nodes_[p].gen = ++gen_;
    return {p};
  }
  std::optional<Change> mkdir(const std::string& p) {
    if (find(p)) return std::nullopt;
    create(p);
    return Change{p};
  }
  // nullopt: nothing to remove; the caller has checked that the parent exists.
  std::optional<Change> rm(const std::string& p) {
    if (!find(p)) return std::nullopt;
    const std::uint64_t g = ++gen_;
    for (auto it = nodes_.lower_bound(p); it != nodes_.end() && is_under(it->first, p);) {
      removed_[it->first] = g;
      it = nodes_.erase(it);
    }
    nodes_[parent_of(p)].gen = g;
    return Change{p, true};
  }
  Change set_perms(const std::string& p, std::vector<std::string> perms) {
    nodes_[p].perms = std::move(perms);
    nodes_[p].gen = ++gen_;
    return {p};
  }

 private:
  // Creates `p` and its missing ancestors, each with its parent's permissions.
  void create(const std::string& p) {
    if (find(p)) return;
    const std::string parent = parent_of(p);
    create(parent);
    const std::uint64_t g = ++gen_;
    nodes_[p] = Node{"", nodes_[parent].perms, g};
    nodes_[parent].gen = g;
  }

  std::map<std::string, Node> nodes_;
  std::map<std::string, std::uint64_t> removed_;
  std::uint64_t gen_ = 0;
};

struct Watch {
  std::string path;
  std::string token;
  bool operator==(const Watch&) const = default;
};

struct Connection {
  UniqueFd fd;
  xs::Decoder decoder;
  std::string out;  // replies and events not yet written, in order
  std::vector<Watch> watches;
};

// A change a transaction made, replayed on the live tree at commit.
struct Op {
  std::uint32_t type;
  std::string path;
  std::string value;
  std::vector<std::string> perms;
};

struct Transaction {
  int conn;
  Tree view;
  std::uint64_t started;
  std::set<std::string> touched;  // read, listed or changed: checked for conflicts at commit
  std::vector<Op> ops;
};

// A request's answer: a payload, or an error name.
struct Answer {
  std::string payload;
  const char* error = nullptr;
};
Answer fail(const char* name) {
  return {{}, name};
}
const Answer ok{std::string("OK", 3)};

}  // namespace

class FakeXenstored::Impl {
 public:
  explicit Impl(std::string path);
  ~Impl();

  const std::string& path() const { return path_; }
  std::optional<std::string> read(const std::string& path) const;
  void write(const std::string& path, const std::string& value);
  void rm(const std::string& path);
  std::vector<std::string> directory(const std::string& path) const;
  std::optional<std::string> perms(const std::string& path) const;
  void fire(const std::string& special);
  void fail_next_commits(int n);
  std::size_t commits() const;
  std::size_t conflicts() const;
  std::size_t dropped_connections() const;
  std::vector<std::string> watched() const;

 private:
  using Words = std::vector<std::string_view>;

  // The server thread and its connections.
  void serve();
  void accept_all();
  void receive(int id);
  void flush_all();
  void close_connection(int id, bool malformed);
  void wake();

  // Requests, on the server thread with mu_ held.
  bool handle(int id, Connection& c, const xs::Message& m);
  Answer dispatch(int id, const xs::Header& h, const Words& w, std::string_view value);
  Answer query(int id, const xs::Header& h, const Words& w);
  Answer change(int id, const xs::Header& h, const Words& w, std::string_view value);
  Answer apply(Tree& tree, const Op& op, bool fire);
  Answer watch(int id, const xs::Header& h, const Words& w);
  Answer transaction_start(int id, const xs::Header& h);
  Answer transaction_end(int id, const xs::Header& h, const Words& w);
  // The transaction `tx_id` of connection `id`; nullptr when it has none of that id.
  Transaction* transaction(int id, std::uint32_t tx_id);
  void fire_change(const Change& c);

  std::string path_;
  UniqueFd listener_;
  UniqueFd wake_rd_;
  UniqueFd wake_wr_;
  mutable std::mutex mu_;  // everything below
  Tree live_;
  std::map<int, Connection> conns_;
  std::map<std::uint32_t, Transaction> txs_;
  int next_conn_ = 0;
  std::uint32_t next_tx_ = 1;
  int fail_commits_ = 0;
  std::size_t commits_ = 0;
  std::size_t conflicts_ = 0;
  std::size_t dropped_ = 0;
  bool stop_ = false;
  std::thread thread_;  // last: starts once everything above exists
};

namespace {

[[noreturn]] void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

void check_path(const std::string& path) {
  if (!valid_path(path)) throw std::invalid_argument("invalid xenstore path: " + path);
}

// Creating or removing a node changes its parent's list of children (and creating a node
// creates its missing ancestors), so those count as touched for the conflict check.
void mark_touched(Transaction& tx, const Op& op) {
  std::string p = op.path;
  tx.touched.insert(p);
  bool lists_change =
      op.type == xs::rm ? tx.view.find(p) != nullptr : op.type != xs::set_perms && !tx.view.find(p);
  while (lists_change && p != "/") {
    p = parent_of(p);
    tx.touched.insert(p);
    lists_change = op.type != xs::rm && !tx.view.find(p);
  }
}

// The piece of `tree`'s child list of `node` from byte `offset` that fits in one payload,
// after the node's generation; a final empty word marks the end of the list.
Answer directory_part(const Tree& tree, const std::string& path, const Node& node,
                      std::string_view offset) {
  const std::string list = xs::join_words(tree.children(path));
  const auto parsed = parse_number(offset);
  if (!parsed) return fail("EINVAL");
  const std::size_t start = *parsed;
  if (start > list.size() || (start > 0 && list[start - 1] != '\0')) return fail("EINVAL");
  std::string payload = std::to_string(node.gen);
  payload.push_back('\0');
  std::size_t end = start;
  while (end < list.size()) {
    const std::size_t next = list.find('\0', end) + 1;
    if (payload.size() + (next - start) + 1 > xs::payload_max) break;
    end = next;
  }
  payload.append(list, start, end - start);
  if (end == list.size()) payload.push_back('\0');
  return {payload};
}

}  // namespace

FakeXenstored::Impl::Impl(std::string path) : path_(std::move(path)) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof(addr.sun_path)) throw std::invalid_argument("socket path too long");
  std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);
  listener_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listener_) throw_errno("socket");
  if (::bind(listener_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw_errno("bind " + path_);
  }
  if (::listen(listener_.get(), 64) != 0) throw_errno("listen");
  int p[2];
  if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) throw_errno("pipe2");
  wake_rd_ = UniqueFd(p[0]);
  wake_wr_ = UniqueFd(p[1]);
  thread_ = std::thread([this] { serve(); });
}

FakeXenstored::Impl::~Impl() {
  {
    const std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake();
  thread_.join();
  conns_.clear();
  ::unlink(path_.c_str());
}

void FakeXenstored::Impl::wake() {
  const char c = 0;
  // A full pipe already holds a wake-up: EAGAIN is fine.
  [[maybe_unused]] const auto n = ::write(wake_wr_.get(), &c, 1);
}

void FakeXenstored::Impl::serve() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    std::vector<pollfd> fds{{listener_.get(), POLLIN, 0}, {wake_rd_.get(), POLLIN, 0}};
    std::vector<int> ids;
    for (const auto& [id, c] : conns_) {
      const short events = c.out.empty() ? POLLIN : POLLIN | POLLOUT;
      fds.push_back({c.fd.get(), events, 0});
      ids.push_back(id);
    }
    lock.unlock();
    const int n = ::poll(fds.data(), fds.size(), -1);
    lock.lock();
    if (n < 0) continue;  // EINTR; nothing else can fail on fds this thread owns
    char drain[64];
    while (::read(wake_rd_.get(), drain, sizeof(drain)) > 0) {
    }
    if (fds[0].revents & POLLIN) accept_all();
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (fds[i + 2].revents & (POLLIN | POLLHUP | POLLERR)) receive(ids[i]);
    }
    flush_all();
  }
}

void FakeXenstored::Impl::accept_all() {
  for (;;) {
    UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) return;
    conns_[next_conn_++].fd = std::move(fd);
  }
}

// Reads what the connection has, then answers every whole request in it, in order.
void FakeXenstored::Impl::receive(int id) {
  Connection& c = conns_.at(id);
  bool closed = false;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(c.fd.get(), buf, sizeof(buf), 0);
    if (n > 0) {
      c.decoder.feed({buf, static_cast<std::size_t>(n)});
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    closed = !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    break;
  }
  xs::Message m;
  for (;;) {
    const auto status = c.decoder.next(m);
    if (status == xs::Decoder::Status::need_more) break;
    if (status != xs::Decoder::Status::message || !handle(id, c, m)) {
      close_connection(id, true);
      return;
    }
  }
  if (closed) close_connection(id, false);
}

void FakeXenstored::Impl::flush_all() {
  std::vector<int> broken;
  for (auto& [id, c] : conns_) {
    while (!c.out.empty()) {
      const ssize_t n = ::send(c.fd.get(), c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        c.out.erase(0, static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      broken.push_back(id);
      break;
    }
  }
  for (const int id : broken) close_connection(id, false);
}

// The connection's watches and transactions end with it, as in xenstored.
void FakeXenstored::Impl::close_connection(int id, bool malformed) {
  std::erase_if(txs_, [id](const auto& t) { return t.second.conn == id; });
  conns_.erase(id);
  if (malformed) ++dropped_;
}

// Events a request causes are queued before its reply, as xenstored does for WRITE: once a
// client has the reply, its own watch events are already on its socket.
bool FakeXenstored::Impl::handle(int id, Connection& c, const xs::Message& m) {
  Words words;
  std::string_view value;
  const std::string_view payload = m.payload;
  if (m.header.type == xs::write) {  // <path>|<value|>: the value is raw bytes
    const auto nul = payload.find('\0');
    if (nul == std::string_view::npos) return false;
    words.push_back(payload.substr(0, nul));
    value = payload.substr(nul + 1);
  } else {
    auto split = xs::split_words(payload);
    if (!split) return false;
    words = std::move(*split);
  }
  const Answer a = dispatch(id, m.header, words, value);
  c.out += a.error ? xs::encode_error(m.header, a.error) : xs::encode_reply(m.header, a.payload);
  return true;
}

Answer FakeXenstored::Impl::dispatch(int id, const xs::Header& h, const Words& w,
                                     std::string_view value) {
  switch (h.type) {
    case xs::read:
    case xs::directory:
    case xs::directory_part:
    case xs::get_perms:
      return query(id, h, w);
    case xs::write:
    case xs::mkdir:
    case xs::rm:
    case xs::set_perms:
      return change(id, h, w, value);
    case xs::watch:
    case xs::unwatch:
      return watch(id, h, w);
    case xs::transaction_start:
      return transaction_start(id, h);
    case xs::transaction_end:
      return transaction_end(id, h, w);
    case xs::get_domain_path:
      if (w.size() != 1 || !valid_domid(w[0])) return fail("EINVAL");
      return {"/local/domain/" + std::to_string(*parse_number(w[0])) + std::string(1, '\0')};
    case xs::reset_watches:
      conns_.at(id).watches.clear();
      std::erase_if(txs_, [id](const auto& t) { return t.second.conn == id; });
      return ok;
    case xs::control:
      return fail("EINVAL");
    default:
      return fail("ENOSYS");
  }
}

Transaction* FakeXenstored::Impl::transaction(int id, std::uint32_t tx_id) {
  const auto it = txs_.find(tx_id);
  return it == txs_.end() || it->second.conn != id ? nullptr : &it->second;
}

Answer FakeXenstored::Impl::query(int id, const xs::Header& h, const Words& w) {
  const std::size_t words = h.type == xs::directory_part ? 2 : 1;
  if (w.size() != words || !valid_path(w[0])) return fail("EINVAL");
  const std::string path(w[0]);
  const Tree* tree = &live_;
  if (h.tx_id != 0) {
    Transaction* tx = transaction(id, h.tx_id);
    if (!tx) return fail("ENOENT");
    tx->touched.insert(path);
    tree = &tx->view;
  }
  const Node* node = tree->find(path);
  if (!node) return fail("ENOENT");
  switch (h.type) {
    case xs::read:
      return {node->value};
    case xs::get_perms:
      return {xs::join_words(node->perms)};
    case xs::directory: {
      std::string list = xs::join_words(tree->children(path));
      if (list.size() > xs::payload_max) return fail("E2BIG");  // libxenstore then asks in parts
      return {std::move(list)};
    }
    default:
      return directory_part(*tree, path, *node, w[1]);
  }
}

Answer FakeXenstored::Impl::change(int id, const xs::Header& h, const Words& w,
                                   std::string_view value) {
  const bool perms = h.type == xs::set_perms;
  if (w.empty() || (perms ? w.size() < 2 : w.size() != 1) || !valid_path(w[0])) {
    return fail("EINVAL");
  }
  Op op{h.type, std::string(w[0]), std::string(value), {w.begin() + 1, w.end()}};
  if (!std::all_of(op.perms.begin(), op.perms.end(), valid_perm)) return fail("EINVAL");
  if (h.tx_id == 0) return apply(live_, op, true);
  Transaction* tx = transaction(id, h.tx_id);
  if (!tx) return fail("ENOENT");
  mark_touched(*tx, op);
  Answer a = apply(tx->view, op, false);
  if (!a.error) tx->ops.push_back(std::move(op));
  return a;
}

// One change on `tree`; `fire`: the live tree, whose watchers hear of it now.
Answer FakeXenstored::Impl::apply(Tree& tree, const Op& op, bool fire) {
  std::optional<Change> c;
  if (op.type == xs::write) {
    c = tree.write(op.path, op.value);
  } else if (op.type == xs::mkdir) {
    c = tree.mkdir(op.path);
  } else if (op.type == xs::rm) {
    if (op.path == "/") return fail("EINVAL");
    if (!tree.find(parent_of(op.path))) return fail("ENOENT");
    c = tree.rm(op.path);
  } else {
    if (!tree.find(op.path)) return fail("ENOENT");
    c = tree.set_perms(op.path, op.perms);
  }
  if (c && fire) fire_change(*c);
  return ok;
}

// WATCH and UNWATCH: <wpath>|<token>|, and an optional reserved word.
Answer FakeXenstored::Impl::watch(int id, const xs::Header& h, const Words& w) {
  if (w.size() < 2 || w.size() > 3) return fail("EINVAL");
  const bool special = w[0].size() > 1 && w[0][0] == '@';
  if (!special && !valid_path(w[0])) return fail("EINVAL");
  Connection& c = conns_.at(id);
  const Watch watch{std::string(w[0]), std::string(w[1])};
  const auto it = std::find(c.watches.begin(), c.watches.end(), watch);
  if (h.type == xs::unwatch) {
    if (it == c.watches.end()) return fail("ENOENT");
    c.watches.erase(it);
    return ok;
  }
  if (it != c.watches.end()) return fail("EEXIST");
  // Every event for it must fit in a payload, whatever path changed.
  if (watch.token.size() + 3072 + 2 > xs::payload_max) return fail("E2BIG");
  c.watches.push_back(watch);
  c.out += xs::encode_event(watch.path, watch.token);  // the initial event
  return ok;
}

Answer FakeXenstored::Impl::transaction_start(int id, const xs::Header& h) {
  if (h.tx_id != 0) return fail("EINVAL");
  const std::uint32_t tx_id = next_tx_++;
  txs_.emplace(tx_id, Transaction{id, live_, live_.generation(), {}, {}});
  return {std::to_string(tx_id) + std::string(1, '\0')};
}

Answer FakeXenstored::Impl::transaction_end(int id, const xs::Header& h, const Words& w) {
  if (!transaction(id, h.tx_id)) return fail("ENOENT");
  if (w.size() != 1 || (w[0] != "T" && w[0] != "F")) return fail("EINVAL");
  const auto node = txs_.extract(h.tx_id);
  const Transaction& tx = node.mapped();
  if (w[0] == "F") return ok;
  const bool conflict = std::any_of(tx.touched.begin(), tx.touched.end(), [&](const auto& p) {
    return live_.changed_at(p) > tx.started;
  });
  if (fail_commits_ > 0 || conflict) {
    fail_commits_ = std::max(0, fail_commits_ - 1);
    ++conflicts_;
    return fail("EAGAIN");
  }
  // Nothing the transaction saw has changed, so each change succeeds again as it did.
  for (const Op& op : tx.ops) apply(live_, op, true);
  ++commits_;
  return ok;
}

void FakeXenstored::Impl::fire_change(const Change& change) {
  for (auto& [id, c] : conns_) {
    for (const Watch& w : c.watches) {
      if (w.path[0] == '@') continue;
      if (is_under(change.path, w.path)) {
        c.out += xs::encode_event(change.path, w.token);
      } else if (change.removed && is_under(w.path, change.path)) {
        c.out += xs::encode_event(w.path, w.token);
      }
    }
  }
}

std::optional<std::string> FakeXenstored::Impl::read(const std::string& path) const {
  check_path(path);
  const std::lock_guard lock(mu_);
  const Node* n = live_.find(path);
  return n ? std::optional(n->value) : std::nullopt;
}

void FakeXenstored::Impl::write(const std::string& path, const std::string& value) {
  check_path(path);
  // No client could have written it, and no READ reply could carry it.
  if (path.size() + 1 + value.size() > xs::payload_max) throw std::length_error("value too long");
  const std::lock_guard lock(mu_);
  fire_change(live_.write(path, value));
  wake();
}

void FakeXenstored::Impl::rm(const std::string& path) {
  check_path(path);
  if (path == "/") throw std::invalid_argument("cannot remove /");
  const std::lock_guard lock(mu_);
  if (const auto c = live_.rm(path)) fire_change(*c);
  wake();
}

std::vector<std::string> FakeXenstored::Impl::directory(const std::string& path) const {
  check_path(path);
  const std::lock_guard lock(mu_);
  return live_.find(path) ? live_.children(path) : std::vector<std::string>{};
}

std::optional<std::string> FakeXenstored::Impl::perms(const std::string& path) const {
  check_path(path);
  const std::lock_guard lock(mu_);
  const Node* n = live_.find(path);
  if (!n) return std::nullopt;
  std::string joined;
  for (const auto& p : n->perms) joined += (joined.empty() ? "" : ",") + p;
  return joined;
}

void FakeXenstored::Impl::fire(const std::string& special) {
  if (special.size() < 2 || special[0] != '@')
    throw std::invalid_argument("not special: " + special);
  const std::lock_guard lock(mu_);
  for (auto& [id, c] : conns_) {
    for (const Watch& w : c.watches) {
      if (w.path == special) c.out += xs::encode_event(special, w.token);
    }
  }
  wake();
}

void FakeXenstored::Impl::fail_next_commits(int n) {
  const std::lock_guard lock(mu_);
  fail_commits_ = n;
}

std::size_t FakeXenstored::Impl::commits() const {
  const std::lock_guard lock(mu_);
  return commits_;
}

std::size_t FakeXenstored::Impl::conflicts() const {
  const std::lock_guard lock(mu_);
  return conflicts_;
}

std::size_t FakeXenstored::Impl::dropped_connections() const {
  const std::lock_guard lock(mu_);
  return dropped_;
}

std::vector<std::string> FakeXenstored::Impl::watched() const {
  const std::lock_guard lock(mu_);
  std::vector<std::string> paths;
  for (const auto& [id, c] : conns_) {
    for (const Watch& w : c.watches) paths.push_back(w.path);
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

FakeXenstored::FakeXenstored(std::string socket_path)
    : impl_(std::make_unique<Impl>(std::move(socket_path))) {}
FakeXenstored::~FakeXenstored() = default;
const std::string& FakeXenstored::socket_path() const {
  return impl_->path();
}
std::optional<std::string> FakeXenstored::read(const std::string& p) const {
  return impl_->read(p);
}
void FakeXenstored::write(const std::string& p, const std::string& v) {
  impl_->write(p, v);
}
void FakeXenstored::rm(const std::string& p) {
  impl_->rm(p);
}
std::vector<std::string> FakeXenstored::directory(const std::string& p) const {
  return impl_->directory(p);
}
std::optional<std::string> FakeXenstored::perms(const std::string& p) const {
  return impl_->perms(p);
}
void FakeXenstored::fire(const std::string& special) {
  impl_->fire(special);
}
void FakeXenstored::fail_next_commits(int n) {
  impl_->fail_next_commits(n);
}
std::size_t FakeXenstored::commits() const {
  return impl_->commits();
}
std::size_t FakeXenstored::conflicts() const {
  return impl_->conflicts();
}
std::size_t FakeXenstored::dropped_connections() const {
  return impl_->dropped_connections();
}
std::vector<std::string> FakeXenstored::watched() const {
  return impl_->watched();
}

}  // namespace qbtest
