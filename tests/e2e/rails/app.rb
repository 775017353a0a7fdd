# frozen_string_literal: true

# A minimal Rails application running Debian's Doorkeeper, configured like GitLab's where it
# shows on the wire. It is the "Rails" upstream of the end-to-end suite: see README.md beside
# this file for the contract (endpoints, env, records).
#
# Everything lives in memory: one SQLite :memory: database (one connection, one Puma thread),
# the Doorkeeper tables created at boot from Doorkeeper's own migration template (with the
# PKCE columns), the applications seeded from RAILS_E2E_CLIENTS.

require "json"
require "logger"
require "securerandom"

clients_path = ENV["RAILS_E2E_CLIENTS"]
abort "rails e2e: RAILS_E2E_CLIENTS must name a JSON file" if clients_path.to_s.empty?
RAILS_E2E_CLIENTS = JSON.parse(File.read(clients_path))
abort "rails e2e: RAILS_E2E_CLIENTS must hold a JSON array" unless RAILS_E2E_CLIENTS.is_a?(Array)

# One connection to one in-memory database: the pool must never open a second one (it would
# be an empty database) nor drop the idle one (idle_timeout=0 turns the flush off).
ENV["DATABASE_URL"] = "sqlite3::memory:?pool=1&idle_timeout=0&checkout_timeout=30"
ENV["RAILS_ENV"] ||= "production"
ENV["RAILS_LOG_TO_STDOUT"] = "1"

require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "action_view/railtie"
require "doorkeeper"

# The server's own record of every /oauth/* request it served, in order. The end-to-end tests
# assert on these (not on the gateway's view) to tell which server served each step.
class E2eRecords
  LOCK = Mutex.new
  @records = []

  class << self
    def add(record)
      LOCK.synchronize { @records << record }
    end

    def all
      LOCK.synchronize { @records.dup }
    end

    def clear
      LOCK.synchronize { @records.clear }
    end
  end

  def initialize(app)
    @app = app
  end

  def call(env)
    path = env["PATH_INFO"].to_s
    case path
    when "/-/health"
      return [200, { "Content-Type" => "text/plain" }, ["ok\n"]]
    when "/test/records"
      return records_endpoint(env)
    end
    # Squeezed as Rails' router squeezes it, so //oauth/token is recorded too.
    squeezed = path.squeeze("/")
    return @app.call(env) unless squeezed == "/oauth" || squeezed.start_with?("/oauth/")

    # Taken before the call: Rails' exception handling rewrites the env (GET /404 ...).
    method = env["REQUEST_METHOD"]
    begin
      status, headers, body = @app.call(env)
    rescue StandardError
      record(env, method, path, 500)
      raise
    end
    record(env, method, path, status)
    [status, headers, body]
  end

  private

  def records_endpoint(env)
    case env["REQUEST_METHOD"]
    when "GET"
      [200, { "Content-Type" => "application/json" }, [JSON.generate(self.class.all)]]
    when "DELETE"
      self.class.clear
      [204, {}, []]
    else
      [405, { "Allow" => "GET, DELETE" }, []]
    end
  end

  def record(env, method, path, status)
    request = ActionDispatch::Request.new(env)
    params = begin
      request.parameters
    rescue StandardError
      {}
    end
    self.class.add(
      "method" => method,
      "path" => path,
      "client_id" => client_id_seen(request, path, params),
      # Whether Doorkeeper authenticated the client (its id and secret matched an
      # application): true/false, or null where Doorkeeper never tried (e.g. /oauth/authorize).
      "client_authenticated" => env["e2e.client_authenticated"],
      "grant_type" => route(env) == "doorkeeper/tokens#create" ? params["grant_type"].presence : nil,
      # What Rails' router made of the path, e.g. "doorkeeper/tokens#create"; null if nothing.
      "route" => route(env),
      "status" => status.to_i,
    )
  end

  def route(env)
    found = env["action_dispatch.request.path_parameters"]
    found && found[:controller] ? "#{found[:controller]}##{found[:action]}" : nil
  end

  # The client id as Doorkeeper takes it from this request: on /oauth/authorize the client_id
  # parameter; elsewhere Doorkeeper's own credential extraction (Basic header first, then the
  # client_id parameter, as configured with `client_credentials :from_basic, :from_params`).
  def client_id_seen(request, path, params)
    if path.start_with?("/oauth/authorize")
      params["client_id"].presence
    else
      methods = Doorkeeper.config.client_credentials_methods
      Doorkeeper::OAuth::Client::Credentials.from_request(request, *methods)&.uid.presence
    end
  rescue StandardError
    nil
  end
end

# Doorkeeper::Server#client authenticates the client once per request: note the outcome for
# the records.
module E2eClientAuthenticationRecorder
  def client
    found = super
    context.request.env["e2e.client_authenticated"] = !found.nil?
    found
  end
end

class E2eRailsApp < Rails::Application
  config.root = __dir__
  config.eager_load = false
  config.cache_classes = true
  config.consider_all_requests_local = false
  config.secret_key_base = SecureRandom.hex(64)
  config.logger = ActiveSupport::TaggedLogging.new(Logger.new($stdout))
  config.log_level = ENV.fetch("RAILS_E2E_LOG_LEVEL", "info").to_sym
  config.hosts.clear
  config.session_store :cookie_store, key: "_e2e_rails_session"
  # CSRF protection off so a script can post the consent form (the contract).
  config.action_controller.allow_forgery_protection = false
  config.active_record.schema_format = :ruby
  config.middleware.insert_before 0, E2eRecords
end

Doorkeeper.configure do
  orm :active_record

  # GitLab: hex tokens (also: no value can start with an IAM prefix like giat_ or ory_).
  default_generator_method :hex

  resource_owner_authenticator do
    user = User.find_by(id: session[:user_id])
    if user
      user
    else
      session[:user_return_to] = request.fullpath
      redirect_to("/test/login")
      nil
    end
  end

  use_refresh_token
  enforce_configured_scopes
  force_ssl_in_redirect_uri false
  forbid_redirect_uri { |uri| %w[data vbscript javascript].include?(uri.scheme.to_s.downcase) }

  # GitLab: DEFAULT_SCOPES = [:api]; a selection of its optional scopes.
  default_scopes :api
  optional_scopes :read_api, :read_user, :read_repository, :write_repository, :read_registry,
                  :write_registry, :sudo, :admin_mode, :openid, :profile, :email,
                  :create_runner, :manage_runner, :k8s_proxy, :ai_features

  client_credentials :from_basic, :from_params
  access_token_methods :from_access_token_param, :from_bearer_authorization, :from_bearer_param

  # GitLab also enables password and device_code; Debian has no Doorkeeper device grant
  # package and the contract does not need the password grant.
  grant_flows %w[authorization_code client_credentials]

  # The normal HTML consent page (GitLab skips it for trusted applications only).
  skip_authorization { false }

  access_token_expires_in 7200
end

Doorkeeper::Server.prepend(E2eClientAuthenticationRecorder)

E2eRailsApp.initialize!

# Consent-page wording for the scopes (GitLab ships its own; Doorkeeper has none).
I18n.backend.store_translations(
  :en,
  doorkeeper: {
    scopes: Doorkeeper.config.scopes.to_a.to_h { |s| [s.to_sym, "Scope #{s}"] }.merge(
      api: "Grants complete read/write access to the API",
      read_user: "Read the authenticated user's personal information",
    ),
  },
)

class User < ActiveRecord::Base
end

# The Doorkeeper tables, as its migration template (migration.rb.erb) plus the PKCE migration
# (enable_pkce_migration.rb.erb) create them.
ActiveRecord::Migration.verbose = false
ActiveRecord::Schema.define do
  create_table :users do |t|
    t.string :username, null: false
    t.timestamps null: false
  end
  add_index :users, :username, unique: true

  create_table :oauth_applications do |t|
    t.string  :name,    null: false
    t.string  :uid,     null: false
    t.string  :secret,  null: false
    t.text    :redirect_uri, null: false
    t.string  :scopes,       null: false, default: ""
    t.boolean :confidential, null: false, default: true
    t.timestamps             null: false
  end
  add_index :oauth_applications, :uid, unique: true

  create_table :oauth_access_grants do |t|
    t.references :resource_owner,  null: false
    t.references :application,     null: false
    t.string   :token,             null: false
    t.integer  :expires_in,        null: false
    t.text     :redirect_uri,      null: false
    t.datetime :created_at,        null: false
    t.datetime :revoked_at
    t.string   :scopes,            null: false, default: ""
    t.string   :code_challenge,        null: true
    t.string   :code_challenge_method, null: true
  end
  add_index :oauth_access_grants, :token, unique: true
  add_foreign_key :oauth_access_grants, :oauth_applications, column: :application_id

  create_table :oauth_access_tokens do |t|
    t.references :resource_owner, index: true
    t.references :application,    null: false
    t.string   :token, null: false
    t.string   :refresh_token
    t.integer  :expires_in
    t.datetime :revoked_at
    t.datetime :created_at, null: false
    t.string   :scopes
    t.string   :previous_refresh_token, null: false, default: ""
  end
  add_index :oauth_access_tokens, :token, unique: true
  add_index :oauth_access_tokens, :refresh_token, unique: true
  add_foreign_key :oauth_access_tokens, :oauth_applications, column: :application_id
end

%w[alice bob].each { |name| User.create!(username: name) }

RAILS_E2E_CLIENTS.each do |client|
  redirect_uri = client["redirect_uri"]
  redirect_uri = redirect_uri.join("\n") if redirect_uri.is_a?(Array)
  Doorkeeper::Application.create!(
    name: client["name"].presence || client.fetch("client_id"),
    uid: client.fetch("client_id"),
    secret: client.fetch("client_secret"),
    redirect_uri: redirect_uri,
    scopes: client["scopes"].presence || "api",
    confidential: true,
  )
end

# Hand the one connection back to the pool so the Puma thread can take it.
ActiveRecord::Base.connection_pool.release_connection

class TestController < ActionController::Base
  # GET /test/login: where Doorkeeper sends a browser with no session.
  def form
    render html: <<~HTML.html_safe
      <!DOCTYPE html><html><head><title>Test login</title></head><body>
      <form action="/test/login" method="post">
      <label>Username <input name="username" value="alice"></label>
      <input type="submit" value="Sign in"></form></body></html>
    HTML
  end

  # POST /test/login username=<name>: no password; an unknown name becomes a new user (so a
  # test can take a fresh user and so always get the consent page, see README).
  def login
    name = params[:username].to_s
    if name.empty? || name.length > 64
      render json: { error: "username required" }, status: :unprocessable_entity
      return
    end
    user = User.find_or_create_by!(username: name)
    reset_session
    session[:user_id] = user.id
    render json: { user: user.username, id: user.id }
  end

  def logout
    reset_session
    render json: {}
  end

  # GET /test/token?token=<value>: Doorkeeper's own record of an access or refresh token, so a
  # test can tell whether a revocation that went through the gateway took effect here.
  def token
    value = params[:token].to_s
    record = Doorkeeper::AccessToken.find_by(token: value) ||
             Doorkeeper::AccessToken.find_by(refresh_token: value)
    return render(json: { found: false }) unless record

    render json: { found: true, revoked: record.revoked?, application: record.application&.uid }
  end
end

# GET /api/v4/user with a Rails-issued access token (GitLab's endpoint for "who am I"). Using a
# token here is also what lets Doorkeeper revoke the refresh token it was refreshed from.
class ApiController < ActionController::Base
  before_action { doorkeeper_authorize! :api, :read_user, :read_api }

  def user
    user = User.find(doorkeeper_token.resource_owner_id)
    render json: { id: user.id, username: user.username }
  end
end

Rails.application.routes.draw do
  use_doorkeeper
  get "/api/v4/user" => "api#user"
  get "/test/login" => "test#form"
  post "/test/login" => "test#login"
  post "/test/logout" => "test#logout"
  get "/test/token" => "test#token"
end

Rails.logger.info(
  "rails e2e: Rails #{Rails.version}, Doorkeeper #{Doorkeeper::VERSION::STRING}, " \
  "#{RAILS_E2E_CLIENTS.size} application(s): " + RAILS_E2E_CLIENTS.map { |c| c["client_id"] }.join(", ")
)
