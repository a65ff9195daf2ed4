#include "broker/xen/store.hpp"

#include <cerrno>
#include <cstdlib>
#include <utility>

extern "C" {
#include <xenstore.h>
}

namespace broker::xen {
namespace {

std::error_code last_error() { return {errno, std::system_category()}; }

Error failed(std::string_view what, std::string_view path) {
  return make_error(last_error(), "xenstore " + std::string(what) + " " + std::string(path));
}

// libxenstore returns malloc'd memory the caller frees.
struct Freer {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Malloced = std::unique_ptr<T, Freer>;

unsigned perm_bits(char kind) {
  switch (kind) {
    case 'r': return XS_PERM_READ;
    case 'w': return XS_PERM_WRITE;
    case 'b': return XS_PERM_READ | XS_PERM_WRITE;
    default: return XS_PERM_NONE;
  }
}

char perm_kind(unsigned type) {
  const unsigned rw = type & (XS_PERM_READ | XS_PERM_WRITE);
  if (rw == (XS_PERM_READ | XS_PERM_WRITE)) return 'b';
  if (rw == XS_PERM_READ) return 'r';
  if (rw == XS_PERM_WRITE) return 'w';
  return 'n';
}

}  // namespace

std::string to_string(const std::vector<Perm>& perms) {
  std::string out;
  for (const auto& p : perms) {
    if (!out.empty()) out += ',';
    out += p.kind + std::to_string(p.domid);
  }
  return out;
}

Result<Store> Store::open() {
  xs_handle* h = ::xs_open(0);
  if (h == nullptr) {
    const char* env = std::getenv("XENSTORED_PATH");
    return Error(last_error(), std::string("cannot connect to xenstored (") +
                                   (env != nullptr ? env : "/var/run/xenstored/socket") +
                                   ", /dev/xen/xenbus)");
  }
  return Store(h);
}

Store::Store(Store&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
Store& Store::operator=(Store&& o) noexcept {
  if (this != &o) {
    if (h_ != nullptr) ::xs_close(h_);
    h_ = std::exchange(o.h_, nullptr);
  }
  return *this;
}
Store::~Store() {
  if (h_ != nullptr) ::xs_close(h_);
}

Result<std::optional<std::string>> Store::read(std::string_view path, Tx tx) {
  unsigned len = 0;
  Malloced<char> v(static_cast<char*>(::xs_read(h_, tx.id, std::string(path).c_str(), &len)));
  if (!v) {
    if (errno == ENOENT) return std::optional<std::string>();
    return failed("read", path);
  }
  return std::optional<std::string>(std::string(v.get(), len));
}

Result<void> Store::write(std::string_view path, std::string_view value, Tx tx) {
  if (!::xs_write(h_, tx.id, std::string(path).c_str(), value.data(),
                  static_cast<unsigned>(value.size()))) {
    return failed("write", path);
  }
  return {};
}

Result<void> Store::mkdir(std::string_view path, Tx tx) {
  if (!::xs_mkdir(h_, tx.id, std::string(path).c_str())) return failed("mkdir", path);
  return {};
}

Result<void> Store::rm(std::string_view path, Tx tx) {
  if (!::xs_rm(h_, tx.id, std::string(path).c_str()) && errno != ENOENT) return failed("rm", path);
  return {};
}

Result<std::vector<std::string>> Store::directory(std::string_view path, Tx tx) {
  unsigned n = 0;
  Malloced<char*> names(::xs_directory(h_, tx.id, std::string(path).c_str(), &n));
  std::vector<std::string> out;
  if (!names) {
    if (errno == ENOENT) return out;
    return failed("directory", path);
  }
  for (unsigned i = 0; i < n; ++i) out.emplace_back(names.get()[i]);
  return out;
}

Result<std::vector<Perm>> Store::perms(std::string_view path, Tx tx) {
  unsigned n = 0;
  Malloced<xs_permissions> p(::xs_get_permissions(h_, tx.id, std::string(path).c_str(), &n));
  if (!p) return failed("get-perms", path);
  std::vector<Perm> out;
  for (unsigned i = 0; i < n; ++i) out.push_back({perm_kind(p.get()[i].perms), p.get()[i].id});
  return out;
}

Result<void> Store::set_perms(std::string_view path, const std::vector<Perm>& perms, Tx tx) {
  std::vector<xs_permissions> p;
  for (const auto& e : perms) p.push_back(xs_permissions{e.domid, perm_bits(e.kind)});
  if (!::xs_set_permissions(h_, tx.id, std::string(path).c_str(), p.data(),
                            static_cast<unsigned>(p.size()))) {
    return failed("set-perms", path);
  }
  return {};
}

Result<int> Store::transact(const std::function<Result<void>(Tx)>& body, int attempts) {
  for (int attempt = 1; attempt <= attempts; ++attempt) {
    const xs_transaction_t t = ::xs_transaction_start(h_);
    if (t == XBT_NULL) return failed("transaction-start", "");
    if (auto ok = body(Tx{t}); !ok) {
      ::xs_transaction_end(h_, t, true);
      return ok.error();
    }
    if (::xs_transaction_end(h_, t, false)) return attempt;
    if (errno != EAGAIN) return failed("transaction-end", "");
  }
  return Error(std::make_error_code(std::errc::resource_unavailable_try_again),
               "xenstore transaction: " + std::to_string(attempts) +
                   " commits in a row conflicted with other writers");
}

Result<void> Store::watch(std::string_view path, std::string_view token) {
  if (!::xs_watch(h_, std::string(path).c_str(), std::string(token).c_str())) {
    return failed("watch", path);
  }
  return {};
}

Result<void> Store::unwatch(std::string_view path, std::string_view token) {
  if (!::xs_unwatch(h_, std::string(path).c_str(), std::string(token).c_str())) {
    return failed("unwatch", path);
  }
  return {};
}

int Store::fileno() const { return ::xs_fileno(h_); }

Result<std::vector<WatchEvent>> Store::take_events() {
  std::vector<WatchEvent> out;
  for (;;) {
    Malloced<char*> ev(::xs_check_watch(h_));
    if (!ev) {
      if (errno == EAGAIN) return out;
      return failed("reading watch events", "");
    }
    out.push_back({ev.get()[XS_WATCH_PATH], ev.get()[XS_WATCH_TOKEN]});
  }
}

}  // namespace broker::xen
